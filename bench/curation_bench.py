"""Curation on the training files: what each filter removes per language, and what it costs.

    python bench/curation_bench.py [--data ../shared/data] [--workers N] [--rounds R]
                                   [--datatrove-python PYTHON]

1. Data preparation of every `*-train*` file, with curation off and on, side by side in one run
   (alternating, `--rounds` times each, best wall time kept): MB/s of text read per wall second.
2. The curation table of the last run with curation on: documents and MB removed (and documents edited,
   MB cut) per filter and language, with the first examples of each filter.
3. With `--datatrove-python` (an interpreter where datatrove is installed): datatrove's Gopher, C4 and
   FineWeb filters against this project's on the same texts, same thresholds, one process, CPU time.
   datatrove splits words with NLTK (English; its punkt data is a download) or spaCy with pyvi
   (Vietnamese); neither is available offline here, so its word and sentence splitters are replaced by
   whitespace and punctuation splits, which is what this project's filters use (and cheaper than the
   real ones).

Last line: `curation_bench: mb_per_s_off=... mb_per_s_on=... removed_pct_vi=... ...`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

LANG_FILES = {"vi": "vi/*-train*", "en": "en/*-train*", "code": "code/*-train*"}


def prepare_side_by_side(data: Path, workers: int | None, rounds: int, tmp: Path) -> tuple[dict, dict]:
    from data_bench import _run
    from extended_tokenizer import extended_smollm2_tokenizer

    files = {lang: sorted(data.glob(pat)) for lang, pat in LANG_FILES.items()}
    if not all(files.values()):
        raise SystemExit(f"no *-train* files under {data}/{{vi,en,code}}")
    tokenizer = extended_smollm2_tokenizer(files["vi"], 55936)
    sources = [{"name": f"{lang}-train", "lang": lang, "paths": [str(p) for p in ps]}
               for lang, ps in files.items()]
    best: dict[bool, dict] = {}
    for r in range(rounds):
        for on in (False, True):
            out = tmp / f"out-{r}-{on}"
            res = _run(sources, tokenizer, out, True, workers, tmp, curation=on)
            shutil.rmtree(out, ignore_errors=True)
            res["mb_per_s"] = res["text_bytes"] / 1e6 / res["wall_s"]
            if on not in best or res["wall_s"] < best[on]["wall_s"]:
                best[on] = res
    return best[False], best[True]


def print_speed(off: dict, on: dict, workers: int | None) -> None:
    print(f"workers: {workers if workers is not None else 'one per core'}, cores: {os.cpu_count()}, "
          f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'curation':<9} {'text MB':>8} {'docs':>6} {'removed':>8} {'dups':>5} {'tokens':>11} "
          f"{'wall s':>7} {'MB/s':>6} {'CPU s':>6} {'MB/CPU-s':>8}")
    for label, r in (("off", off), ("on", on)):
        print(f"{label:<9} {r['text_bytes'] / 1e6:>8.1f} {r['docs']:>6} {r['removed']:>8} {r['dups']:>5} "
              f"{r['tokens']:>11,} {r['wall_s']:>7.1f} {r['mb_per_s']:>6.2f} {r['cpu_s']:>6.1f} "
              f"{r['text_bytes'] / 1e6 / r['cpu_s']:>8.2f}")


def print_table(on: dict) -> dict[str, float]:
    """The per-filter table; returns the share of documents and bytes removed per language."""
    print(f"\n{'lang':<5} {'filter':<18} {'docs removed':>12} {'MB removed':>10} {'docs edited':>11} "
          f"{'MB cut':>7}")
    shares: dict[str, float] = {}
    examples = []
    for name, src in on["sources"].items():
        lang = name.split("-")[0]
        docs = bytes_ = 0
        for fname, f in sorted(src["filters"].items()):
            print(f"{lang:<5} {fname:<18} {f['docs']:>12} {f['bytes'] / 1e6:>10.2f} {f['edited']:>11} "
                  f"{f['edited_bytes'] / 1e6:>7.2f}")
            docs += f["docs"]
            bytes_ += f["bytes"]
            examples += [(lang, fname, e) for e in f["examples"]]
        print(f"{lang:<5} {'(all)':<18} {docs:>12} {bytes_ / 1e6:>10.2f}   of {src['docs_read']} docs, "
              f"{src['bytes_read'] / 1e6:.1f} MB")
        shares[f"removed_pct_{lang}"] = 100 * docs / max(1, src["docs_read"])
        shares[f"removed_mb_pct_{lang}"] = 100 * bytes_ / max(1, src["bytes_read"])
    print("\nexamples (first three per filter and language):")
    for lang, fname, e in examples:
        text = " ".join(e["text"].split())[:110]
        print(f"  {lang} {fname} [{e['rule']}] {e['id']}: {text}")
    return shares


# ----------------------------------------------------------------------------- datatrove comparison
def _dt_config(lang: str) -> dict:
    from vinasmol_core.data.curation import CurationSpec

    rules = CurationSpec().for_lang(lang)
    g, q, f, c = rules.gopher_repetition, rules.gopher_quality, rules.fineweb, rules.c4
    return {
        "gopher_repetition": dict(dup_line_frac=g.dup_line_frac, dup_para_frac=g.dup_para_frac,
                                  dup_line_char_frac=g.dup_line_char_frac,
                                  dup_para_char_frac=g.dup_para_char_frac, top_n_grams=g.top_ngrams,
                                  dup_n_grams=g.dup_ngrams),
        "gopher_quality": dict(min_doc_words=q.min_words, max_doc_words=q.max_words,
                               min_avg_word_length=q.min_avg_word_chars,
                               max_avg_word_length=q.max_avg_word_chars,
                               max_symbol_word_ratio=q.max_symbol_word_ratio,
                               max_bullet_lines_ratio=q.max_bullet_lines,
                               max_ellipsis_lines_ratio=q.max_ellipsis_lines,
                               max_non_alpha_words_ratio=q.min_alpha_words, min_stop_words=q.min_stop_words,
                               stop_words=list(q.stop_words)),
        "c4": dict(filter_no_terminal_punct=c.line_end_punct, min_num_sentences=c.min_sentences,
                   min_words_per_line=c.min_words_per_line, max_word_length=c.max_word_chars),
        "fineweb": dict(line_punct_thr=f.min_line_punct, short_line_thr=f.max_short_lines,
                        short_line_length=f.short_line_chars, char_duplicates_ratio=f.max_dup_line_chars,
                        new_line_ratio=f.max_newlines_per_word),
    }


def _c4_removes(curate, text: str, rules) -> str | None:  # noqa: ANN001
    kept, rule = curate.c4(text, rules)
    return rule if kept is None else None


def compare_child(data: Path, max_mb: float) -> None:
    """Run in an interpreter with datatrove: time both implementations of each filter on each language."""
    import gzip
    import re

    import orjson
    from datatrove.data import Document
    from datatrove.pipeline.filters import c4_filters, fineweb_quality_filter, gopher_quality_filter
    from datatrove.pipeline.filters import gopher_repetition_filter as grf

    from vinasmol_core.data import curate
    from vinasmol_core.data.clean import normalize_text
    from vinasmol_core.data.curation import CurationSpec

    sentence_end = re.compile(r"(?<=[.!?…])\s+")
    for mod in (grf, gopher_quality_filter, fineweb_quality_filter):
        mod.split_into_words = lambda text, language=None: text.split()  # type: ignore[attr-defined]
    c4_filters.split_into_sentences = lambda text, language=None: [  # type: ignore[attr-defined]
        s for s in sentence_end.split(text) if s]
    spec = CurationSpec()
    ours_fns = {
        "gopher_repetition": lambda t, r, lang: curate.gopher_repetition(curate._Doc(t), r),
        "gopher_quality": lambda t, r, lang: curate.gopher_quality(curate._Doc(t), r),
        "c4": lambda t, r, lang: _c4_removes(curate, t, r),
        "fineweb": lambda t, r, lang: curate.fineweb(curate._Doc(t), r),
    }
    classes = {"gopher_repetition": grf.GopherRepetitionFilter,
               "gopher_quality": gopher_quality_filter.GopherQualityFilter,
               "c4": c4_filters.C4QualityFilter, "fineweb": fineweb_quality_filter.FineWebQualityFilter}
    print(f"{'lang':<5} {'filter':<18} {'MB':>5} {'ours MB/CPU-s':>13} {'datatrove MB/CPU-s':>18} "
          f"{'removed: ours':>13} {'datatrove':>9} {'both':>5}")
    out = {}
    for lang in ("vi", "en"):
        texts: list[str] = []
        size = 0
        for p in sorted(data.glob(LANG_FILES[lang])):
            for line in gzip.open(p):
                texts.append(normalize_text(orjson.loads(line)["text"]))
                size += len(texts[-1].encode())
                if size > max_mb * 1e6:
                    break
        mb = size / 1e6
        for name, fn in ours_fns.items():
            rules = getattr(spec.for_lang(lang), name)
            t0 = time.process_time()
            ours = {i for i, t in enumerate(texts) if fn(t, rules, lang) is not None}
            t_ours = time.process_time() - t0
            flt = classes[name](**_dt_config(lang)[name])
            t0 = time.process_time()
            theirs = set()
            for i, t in enumerate(texts):
                res = flt.filter(Document(text=t, id=str(i)))
                if res is not True and (res is False or not res[0]):
                    theirs.add(i)
            t_dt = time.process_time() - t0
            print(f"{lang:<5} {name:<18} {mb:>5.1f} {mb / t_ours:>13.1f} {mb / t_dt:>18.1f} "
                  f"{len(ours):>13} {len(theirs):>9} {len(ours & theirs):>5}")
            out[f"{lang}_{name}"] = (mb / t_ours, mb / t_dt)
    ratio = sum(a / b for a, b in out.values()) / len(out)
    print(f"datatrove_compare: mean_speedup_ours={ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--datatrove-python", default=None, help="an interpreter with datatrove installed")
    parser.add_argument("--compare-mb", type=float, default=20.0, help="text per language for datatrove")
    parser.add_argument("--compare-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compare_child:
        compare_child(args.data, args.compare_mb)
        return
    tmp = Path(tempfile.mkdtemp(prefix="curation-bench-"))
    try:
        off, on = prepare_side_by_side(args.data, args.workers, args.rounds, tmp)
        print_speed(off, on, args.workers)
        shares = print_table(on)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.datatrove_python:
        print("\ndatatrove against this project's filters (same texts and thresholds, CPU time):", flush=True)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        subprocess.run([args.datatrove_python, __file__, "--compare-child", "--data", str(args.data),
                        "--compare-mb", str(args.compare_mb)], check=True, env=env)
    extra = " ".join(f"{k}={v:.1f}" for k, v in shares.items())
    print(f"curation_bench: mb_per_s_off={off['mb_per_s']:.2f} mb_per_s_on={on['mb_per_s']:.2f} "
          f"mb_per_cpu_s_off={off['text_bytes'] / 1e6 / off['cpu_s']:.2f} "
          f"mb_per_cpu_s_on={on['text_bytes'] / 1e6 / on['cpu_s']:.2f} {extra}")


if __name__ == "__main__":
    main()
