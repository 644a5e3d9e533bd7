"""Data preparation throughput and memory: all corpora end to end, then the same corpora 4 times.

    python bench/data_bench.py [--data ../shared/data] [--tokenizer DIR] [--workers N] [--no-curation]

Each prepare runs in a child process of its own. Throughput is text bytes read (the UTF-8 size of
every document's text field) divided by the wall time of `prepare_dataset` (source hashing, reading,
parsing, cleaning, curation (the recipe's defaults; --no-curation for none), dedup, split, tokenization
and shard writing). Peak RSS is the larger of the
process tree's summed RSS (sampled every 50 ms: the main process plus its worker processes) and
the largest single process's ru_maxrss. The 4x run lists every training file four times as
separate sources with exact dedup off (it would drop the copies), to show memory stays flat.

Then, side by side in one process, the fast path's encoder against tiktoken with the tokenizer's
full regex (lookahead included) on the same texts (alternating, best of three runs each).

Default tokenizer: the real SmolLM2 tokenizer (built offline by vinasmol_core.builtin.smollm2) extended
to 55,936 tokens on vi/*-train (built once into .cache/bench, not timed); --tokenizer for
another. Last line: `data_bench: mb_per_s=... peak_rss_mb=...
mb_per_s_4x=... peak_rss_mb_4x=...`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _child(spec_path: str) -> None:
    """Run one prepare_dataset (in this process) and print its numbers as JSON."""
    from vinasmol_core.data import CurationSpec, PrepareSettings, SourceSpec, prepare_dataset

    spec = json.loads(Path(spec_path).read_text())
    sources = [SourceSpec(**s) for s in spec["sources"]]
    t0 = time.perf_counter()
    curation = CurationSpec() if spec.get("curation", True) else None
    settings = PrepareSettings(val_fraction=0.01, dedup=spec["dedup"], workers=spec["workers"],
                               curation=curation)
    info = prepare_dataset(sources, Path(spec["tokenizer"]), Path(spec["out"]), settings)
    wall = time.perf_counter() - t0
    stats = list(info.sources.values())
    print(json.dumps({
        "wall_s": wall,
        "text_bytes": sum(s.bytes_read for s in stats),
        "tokens": info.token_counts["total"] + info.token_counts["val/total"],
        "docs": sum(s.docs_read for s in stats),
        "dups": sum(s.exact_duplicates for s in stats),
        "removed": sum(sum(s.removed.values()) for s in stats),
        "sources": {name: {"docs_read": s.docs_read, "bytes_read": s.bytes_read,
                           "filters": {k: f.model_dump() for k, f in s.filters.items()}}
                    for name, s in info.sources.items()},
    }))


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _run(sources: list[dict], tokenizer: Path, out: Path, dedup: bool, workers: int | None,
         tmp: Path, curation: bool = True) -> dict:
    spec_path = tmp / f"spec-{out.name}.json"
    spec_path.write_text(json.dumps({"sources": sources, "tokenizer": str(tokenizer), "out": str(out),
                                     "dedup": dedup, "workers": workers, "curation": curation}))
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                            stdout=subprocess.PIPE, cwd=REPO)
    peak_tree = 0
    while True:  # wait4 gives this child's own rusage (its workers included), unlike RUSAGE_CHILDREN
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak_tree = max(peak_tree, _tree_rss(proc.pid))
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = proc.stdout.read().decode() if proc.stdout else ""
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed (exit {proc.returncode})")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_tree_mb"] = peak_tree / 2**20
    result["maxrss_mb"] = usage.ru_maxrss / 1024  # kB on Linux
    result["cpu_s"] = usage.ru_utime + usage.ru_stime  # the child and its reaped workers
    return result


def encoder_table(files: dict[str, list[Path]], tokenizer: Path) -> None:
    """Side by side on the same texts, in this process: the fast path's `encode` (ids, EOS) with the
    tokenizer's full pattern on every text, then as prepare runs it (cut at the lookahead's splits)."""
    import gzip

    import numpy as np
    import orjson
    from tokenizers import Tokenizer

    from vinasmol_core.data.fastbpe import FastByteLevelBPE

    path = tokenizer / "tokenizer.json"
    fast = FastByteLevelBPE.create(Tokenizer.from_file(str(path)), path, np.dtype(np.uint16))
    if fast is None:
        print("encoder: the tokenizer has no fast path")
        return
    print(f"{'lang':<5} {'text MB':>8} {'full pattern s':>15} {'cut at runs s':>14} {'speed-up':>9}")
    for lang, paths in files.items():
        texts = [orjson.loads(line)["text"] for p in paths for line in gzip.open(p)]
        seconds: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(3):  # alternating, best of three: this machine's speed drifts
            for cut in (False, True):
                fast.cut_whitespace_runs = cut
                t0 = time.perf_counter()
                for i in range(0, len(texts), 256):
                    fast.encode(texts[i : i + 256], eos_id=0)
                seconds[cut].append(time.perf_counter() - t0)
        full, cut_s = min(seconds[False]), min(seconds[True])
        mb = sum(len(t.encode()) for t in texts) / 1e6
        print(f"{lang:<5} {mb:>8.1f} {full:>15.2f} {cut_s:>14.2f} {full / cut_s:>8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer folder (default: SmolLM2's, extended on the vi training file)")
    parser.add_argument("--target-vocab-size", type=int, default=55936)
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--no-curation", action="store_true", help="prepare without the curation filters")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return

    files = {
        "vi": sorted((args.data / "vi").glob("*-train.jsonl.gz")),
        "en": sorted((args.data / "en").glob("*-train.jsonl.gz")),
        "code": sorted((args.data / "code").glob("*-train.jsonl.gz")),
    }
    if not all(files.values()):
        raise SystemExit(f"no *-train.jsonl.gz under {args.data}/{{vi,en,code}}")
    tmp = Path(tempfile.mkdtemp(prefix="data-bench-"))
    try:
        from extended_tokenizer import extended_smollm2_tokenizer  # bench/, this script's folder

        tokenizer = args.tokenizer or extended_smollm2_tokenizer(files["vi"], args.target_vocab_size)
        runs = []
        one = [{"name": f"{lang}-train", "lang": lang, "paths": [str(p) for p in ps]}
               for lang, ps in files.items()]
        many = [{"name": f"{lang}-copy{k}", "lang": lang, "paths": [str(p) for p in ps]}
                for k in range(args.repeat) for lang, ps in files.items()]
        for label, sources, dedup in (("1x", one, True), (f"{args.repeat}x", many, False)):
            r = _run(sources, tokenizer, tmp / f"out-{label}", dedup, args.workers, tmp,
                     curation=not args.no_curation)
            r["peak_rss_mb"] = max(r["peak_tree_mb"], r["maxrss_mb"])
            r["label"], r["dedup"] = label, dedup
            runs.append(r)
            shutil.rmtree(tmp / f"out-{label}", ignore_errors=True)
        cores = len(os.sched_getaffinity(0))
        print(f"cores: {cores}, load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}, "
              f"tokenizer: {tokenizer}, curation: {'off' if args.no_curation else 'on'}")
        header = (f"{'run':<5} {'dedup':<6} {'text MB':>8} {'docs':>7} {'tokens':>11} {'wall s':>7} "
                  f"{'MB/s':>6} {'CPU s':>7} {'MB/CPU-s':>8} {'tree RSS MB':>11} {'max proc MB':>11}")
        print(header)
        print("-" * len(header))
        for r in runs:
            mbps = r["text_bytes"] / 1e6 / r["wall_s"]
            r["mb_per_s"] = mbps
            print(f"{r['label']:<5} {str(r['dedup']):<6} {r['text_bytes'] / 1e6:>8.1f} {r['docs']:>7} "
                  f"{r['tokens']:>11,} {r['wall_s']:>7.1f} {mbps:>6.2f} {r['cpu_s']:>7.1f} "
                  f"{r['text_bytes'] / 1e6 / r['cpu_s']:>8.2f} {r['peak_tree_mb']:>11.0f} "
                  f"{r['maxrss_mb']:>11.0f}")
        print("wall MB/s is end to end on this machine as loaded; MB/CPU-s is text per CPU-second of the "
              "prepare process and its workers (CPU s includes process start and source hashing)")
        encoder_table(files, tokenizer)
        a, b = runs
        print(f"data_bench: mb_per_s={a['mb_per_s']:.2f} peak_rss_mb={a['peak_rss_mb']:.0f} "
              f"mb_per_s_4x={b['mb_per_s']:.2f} peak_rss_mb_4x={b['peak_rss_mb']:.0f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
