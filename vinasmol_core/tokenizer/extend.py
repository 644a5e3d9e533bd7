"""The "merge vocabulary" step: extend a base byte-level BPE tokenizer with new merges learned on
word counts, and write the result as an HF tokenizer folder.

What the output keeps from the base: ids 0..V_base-1 and their strings, every base merge in its
order, the added/special tokens, the pre-tokenizer, the decoder and the post-processor. What it
adds: new tokens V_base.. as BPE merges ranked after all base merges (never AddedTokens), each
produced when the training words are encoded, and an NFC normaliser inside tokenizer.json (it
changes nothing for ASCII text). tokenizer_config.json keeps the base's special-token conventions
(SmolLM2: `<|endoftext|>`, id 0, as bos, eos and unk) and names the class
`PreTrainedTokenizerFast`, which makes transformers load tokenizer.json as written (its
`GPT2Tokenizer` class rebuilds the pipeline from vocab and merges and would drop the normaliser).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from vinasmol_core.common.errors import ConfigError, VinaSmolError
from vinasmol_core.tokenizer.base import BaseTokenizer, encode_words
from vinasmol_core.tokenizer.counts import WordCounts
from vinasmol_core.tokenizer.text import byte_level_to_text, unicode_to_bytes
from vinasmol_core.tokenizer.trainer import TrainResult, continue_bpe

DEFAULT_TARGET_VOCAB_SIZE = 55936
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
REPORT_FILE = "tokenizer_extension.json"
EOT = "<|endoftext|>"
MAX_REPAIR_ROUNDS = 3


class ExtendResult(BaseModel):
    """What `extend_tokenizer` wrote."""

    out_dir: Path
    vocab_size: int
    base_vocab_size: int
    target_vocab_size: int
    new_tokens: int
    shortfall: str | None = None
    base_sha256: str = ""
    tokenizer_sha256: str = ""
    skipped_existing: int = 0
    skipped_exhausting: int = 0
    byte_tokens: list[str] = Field(default_factory=list, description="bytes (hex) added to the alphabet")
    sample_new_tokens: list[str] = Field(default_factory=list)
    timings_s: dict[str, float] = Field(default_factory=dict)


def validate_target(target_vocab_size: int, base_vocab_size: int) -> None:
    """Raise ConfigError unless the target is an int, a multiple of 64 and above the base size."""
    if isinstance(target_vocab_size, bool) or not isinstance(target_vocab_size, int):
        raise ConfigError(f"target_vocab_size must be an integer, not {target_vocab_size!r}")
    if target_vocab_size % 64:
        low = target_vocab_size // 64 * 64
        raise ConfigError(f"target_vocab_size must be a multiple of 64; {target_vocab_size} is not "
                          f"(nearest: {low} or {low + 64})")
    if target_vocab_size <= base_vocab_size:
        raise ConfigError(f"target_vocab_size {target_vocab_size} must be larger than the base vocabulary "
                          f"({base_vocab_size})")


def with_nfc(normalizer: dict[str, Any] | None) -> dict[str, Any]:
    """The base normaliser with NFC in front (just NFC when the base has none)."""
    if normalizer is None:
        return {"type": "NFC"}
    if normalizer.get("type") == "NFC":
        return normalizer
    if normalizer.get("type") == "Sequence":
        steps = list(normalizer.get("normalizers") or [])
        if steps and steps[0].get("type") == "NFC":
            return normalizer
        return {"type": "Sequence", "normalizers": [{"type": "NFC"}, *steps]}
    return {"type": "Sequence", "normalizers": [{"type": "NFC"}, normalizer]}


def _check_inputs(base: BaseTokenizer, counts: WordCounts, language: str | None,
                  min_language_share: float) -> None:
    norm = base.data.get("normalizer")
    if norm is not None and with_nfc(None) != norm:
        raise VinaSmolError(f"{base.path}: base tokenizer has a normaliser ({norm.get('type')}); only "
                            "GPT-2-style tokenizers without one (or with NFC) are supported")
    if json.dumps(counts.pre_tokenizer, sort_keys=True) != json.dumps(base.data.get("pre_tokenizer"),
                                                                       sort_keys=True):
        raise VinaSmolError("the word counts were made with another pre-tokenizer than the base tokenizer's "
                            f"({base.path}); count the corpus again with this base")
    if counts.normalizer != "NFC":
        raise VinaSmolError(f"the word counts were made with normaliser {counts.normalizer!r}, not NFC")
    if not counts.words:
        raise VinaSmolError("the word counts are empty: the corpus held no text")
    if language == "vi":
        letters = max(counts.stats.letters, 1)
        share = counts.stats.vietnamese_letters / letters
        if counts.stats.vietnamese_letters == 0 or share < min_language_share:
            raise VinaSmolError(
                "the corpus has no Vietnamese text to learn from: "
                f"{counts.stats.vietnamese_letters:,} of its {counts.stats.letters:,} letters are "
                f"Vietnamese letters ({share:.3%}; at least {min_language_share:.1%} expected)")
    elif language is not None:
        raise ConfigError(f"language must be 'vi' or None, not {language!r}")


def _produced_counts(seqs: list[list[int]], freqs: list[int], size: int) -> list[int]:
    import numpy as np

    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=int(lengths.sum()))
    weights = np.repeat(np.asarray(freqs, dtype=np.int64), lengths)
    return np.bincount(flat, weights=weights, minlength=size).astype(np.int64).tolist()


def train_merges(base: BaseTokenizer, counts: WordCounts, n_new: int, *, byte_tokens: list[str] | None = None,
                 min_frequency: int = 2, timings: dict[str, float] | None = None) -> TrainResult:
    """Learn up to `n_new` merges and verify them with the Rust BPE model: every training word
    must be segmented exactly as the trainer did and every new token must be produced. Tokens
    that are not get their merges forbidden and training runs again (at most a few rounds).

    `byte_tokens`: byte-level symbols the base lacks, appended to its alphabet first (ids
    V_base..); they are exempt from the "produced" rule."""
    timings = timings if timings is not None else {}
    t0 = time.perf_counter()
    items = counts.sorted_items()
    words = [w for w, _ in items]
    freqs = [c for _, c in items]
    alphabet = base.tokens + list(byte_tokens or [])
    base_seqs = encode_words(base.model_tokenizer(alphabet), words)
    timings["segment"] = time.perf_counter() - t0
    forbidden: set[tuple[int, int]] = set()
    size = len(alphabet)
    for _round in range(MAX_REPAIR_ROUNDS):
        t1 = time.perf_counter()
        result = continue_bpe(base_seqs, freqs, alphabet, n_new, reserved=base.added_contents(),
                              forbidden=forbidden, min_frequency=min_frequency)
        timings["train"] = timings.get("train", 0.0) + time.perf_counter() - t1
        t2 = time.perf_counter()
        tokens = alphabet + result.tokens
        merges = base.merges + [(tokens[a], tokens[b]) for a, b in result.merges]
        got = encode_words(base.model_tokenizer(tokens, merges), words)
        produced = _produced_counts(got, freqs, len(tokens))
        timings["verify"] = timings.get("verify", 0.0) + time.perf_counter() - t2
        mismatched = sum(1 for x, y in zip(got, result.seqs, strict=True) if x != y)
        unproduced = [i for i in range(size, len(tokens)) if produced[i] <= 0]
        if not unproduced and not mismatched:
            result.token_counts = produced[size:]
            return result
        if not unproduced:
            raise VinaSmolError(f"internal check failed: the extended BPE model segments {mismatched} "
                                "training words differently from the trainer")
        forbidden.update(result.merges[i - size] for i in unproduced)
    raise VinaSmolError(f"could not make every new token reachable after {MAX_REPAIR_ROUNDS} rounds "
                        f"({len(unproduced)} tokens never produced)")


def build_tokenizer_json(base: BaseTokenizer, new_tokens: list[str],
                         new_merges: list[tuple[str, str]]) -> dict[str, Any]:
    """The extended tokenizer.json: the base document with the vocabulary, merges and normaliser
    extended; everything else as the base has it."""
    data = json.loads(json.dumps(base.data))
    model = data["model"]
    tokens = base.tokens + new_tokens
    model["vocab"] = {t: i for i, t in enumerate(tokens)}
    model["merges"] = [list(m) for m in base.merges] + [list(m) for m in new_merges]
    data["normalizer"] = with_nfc(data.get("normalizer"))
    return data


def _optional_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when there is no such file."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VinaSmolError(f"{path}: not valid JSON ({exc})") from None


def _tokenizer_config(base: BaseTokenizer, vocab_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    folder = base.folder
    config = _optional_json(folder / "tokenizer_config.json")
    added = base.data.get("added_tokens") or []
    contents = [t["content"] for t in added]
    default_special = EOT if EOT in contents else (contents[0] if contents else None)
    if default_special is not None:
        for key in ("bos_token", "eos_token", "unk_token"):
            config.setdefault(key, default_special)
    if added and "added_tokens_decoder" not in config:
        config["added_tokens_decoder"] = {
            str(t["id"]): {k: t.get(k, False) for k in ("content", "lstrip", "normalized", "rstrip",
                                                        "single_word", "special")}
            for t in added
        }
    config.setdefault("add_prefix_space", False)
    config.setdefault("clean_up_tokenization_spaces", False)
    config.setdefault("model_max_length", 8192)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if "vocab_size" in config:
        config["vocab_size"] = vocab_size
    map_file = folder / "special_tokens_map.json"
    special = _optional_json(map_file)
    if not map_file.is_file():
        for key in ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens"):
            if key in config:
                special[key] = config[key]
    return config, special


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def install_folder(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move a finished temporary folder to `out_dir` (replacing it only if allowed)."""
    if out_dir.exists():
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        elif not overwrite:
            raise VinaSmolError(f"{out_dir} already exists and is not empty (use overwrite to replace it)")
        else:
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, trash / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
            return
    os.replace(tmp, out_dir)


def extend_tokenizer(
    base_dir: Path,
    counts: WordCounts,
    target_vocab_size: int = DEFAULT_TARGET_VOCAB_SIZE,
    out_dir: Path | None = None,
    *,
    language: str | None = "vi",
    min_language_share: float = 0.005,
    min_new_tokens: int = 64,
    min_frequency: int = 2,
    complete_alphabet: bool = True,
    overwrite: bool = False,
) -> ExtendResult:
    """Extend the byte-level BPE tokenizer in `base_dir` to `target_vocab_size` tokens with merges
    learned on `counts`; write tokenizer.json, tokenizer_config.json, special_tokens_map.json and
    tokenizer_extension.json (what was added) into `out_dir`.

    Fewer tokens are added when the corpus supports fewer (pairs seen at least `min_frequency`
    times); `ExtendResult.shortfall` then says so. Raises ConfigError / VinaSmolError (and writes
    nothing) for a bad target size, a base that is not byte-level BPE, counts made with another
    pre-tokenizer, a corpus without Vietnamese text (`language="vi"`), or fewer than
    `min_new_tokens` possible new tokens.

    `complete_alphabet`: first add the byte-level symbols of bytes UTF-8 text can hold that the
    base lacks (SmolLM2 lacks eight), so that no character is silently dropped and
    decode(encode(x)) == NFC(x) holds for every string; they are the only new tokens that are
    not merges and need not occur in the corpus."""
    if out_dir is None:
        raise ConfigError("out_dir is required")
    out_dir = Path(out_dir)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    base = BaseTokenizer.load(Path(base_dir))
    validate_target(target_vocab_size, base.vocab_size)
    _check_inputs(base, counts, language, min_language_share)
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise VinaSmolError(f"{out_dir} already exists and is not empty (use overwrite to replace it)")

    byte_tokens, result, shortfall = _learn_tokens(base, counts, target_vocab_size, complete_alphabet,
                                                   min_new_tokens, min_frequency, timings)
    added = len(byte_tokens) + len(result.tokens)
    vocab_size = base.vocab_size + added

    t1 = time.perf_counter()
    all_tokens = base.tokens + byte_tokens + result.tokens
    new_merges = [(all_tokens[a], all_tokens[b]) for a, b in result.merges]
    data = build_tokenizer_json(base, byte_tokens + result.tokens, new_merges)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        _write_tokenizer_files(tmp, base, data, vocab_size)
        out = ExtendResult(
            out_dir=out_dir, vocab_size=vocab_size, base_vocab_size=base.vocab_size,
            target_vocab_size=target_vocab_size, new_tokens=added, shortfall=shortfall,
            base_sha256=base.sha256, tokenizer_sha256=_sha256(tmp / "tokenizer.json"),
            skipped_existing=result.skipped_existing, skipped_exhausting=result.skipped_exhausting,
            byte_tokens=[f"0x{unicode_to_bytes()[t]:02x}" for t in byte_tokens],
            sample_new_tokens=[byte_level_to_text(t) for t in result.tokens[:40]], timings_s=timings,
        )
        _write_report(tmp, out, counts, min_frequency)
        timings["write"] = time.perf_counter() - t1
        install_folder(tmp, out_dir, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    timings["total"] = time.perf_counter() - t0
    out.timings_s = {k: round(v, 3) for k, v in timings.items()}
    return out


def _learn_tokens(base: BaseTokenizer, counts: WordCounts, target_vocab_size: int, complete_alphabet: bool,
                  min_new_tokens: int, min_frequency: int,
                  timings: dict[str, float]) -> tuple[list[str], TrainResult, str | None]:
    """The byte symbols the base lacks (when `complete_alphabet`) and the merges learned on `counts`,
    with a note when fewer tokens than asked for were added; raises below `min_new_tokens` merges."""
    byte_tokens = base.missing_byte_symbols() if complete_alphabet else []
    n_new = target_vocab_size - base.vocab_size
    result = train_merges(base, counts, n_new - len(byte_tokens), byte_tokens=byte_tokens,
                          min_frequency=min_frequency, timings=timings)
    added = len(byte_tokens) + len(result.tokens)
    if len(result.tokens) < min_new_tokens:
        raise VinaSmolError(
            f"the corpus supports only {len(result.tokens)} new tokens (pairs seen at least {min_frequency} "
            f"times), fewer than the {min_new_tokens} required: is it Vietnamese text, and large enough?")
    shortfall = None
    if added < n_new:
        shortfall = (f"the corpus supports only {added:,} new tokens, not the {n_new:,} asked for: the "
                     f"vocabulary has {base.vocab_size + added:,} tokens instead of target_vocab_size "
                     f"{target_vocab_size:,}")
    return byte_tokens, result, shortfall


def _write_tokenizer_files(tmp: Path, base: BaseTokenizer, data: dict[str, Any], vocab_size: int) -> None:
    """tokenizer.json (checked to hold `vocab_size` tokens), tokenizer_config.json and
    special_tokens_map.json into `tmp`."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise VinaSmolError(f"internal check failed: the written tokenizer has "
                            f"{tok.get_vocab_size(with_added_tokens=True)} tokens, expected {vocab_size}")
    tok.save(str(tmp / "tokenizer.json"), pretty=True)
    config, special = _tokenizer_config(base, vocab_size)
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")


def _write_report(tmp: Path, out: ExtendResult, counts: WordCounts, min_frequency: int) -> None:
    """tokenizer_extension.json: what was added, from what corpus."""
    report = out.model_dump(mode="json", exclude={"out_dir", "timings_s"})
    report["corpus"] = counts.stats.model_dump()
    report["min_frequency"] = min_frequency
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                                   encoding="utf-8")


PROBE_TEXTS = (
    "Hà Nội là thủ đô của nước Cộng hòa Xã hội chủ nghĩa Việt Nam.",
    "Tiếng Việt có sáu thanh điệu.",  # NFD below: the normaliser must compose it
    "The quick brown fox jumps over the lazy dog, 1234567 times!",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tprint('done')",
    "<|endoftext|>Xin chào<|endoftext|>  \n\n  trailing   spaces\t\r\n",
    "Emoji 😀👍🏽 and ½ ² ℃, mixed 漢字 Ελληνικά русский العربية",
)


def check_transformers_parity(folder: Path, texts: tuple[str, ...] | list[str] = PROBE_TEXTS) -> None:
    """Raise VinaSmolError unless transformers.AutoTokenizer loads `folder` and gives the same ids
    as tokenizers.Tokenizer.from_file on `texts` (each also in NFD form), with the base's bos/eos/unk."""
    import unicodedata

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    folder = Path(folder)
    rust = Tokenizer.from_file(str(folder / "tokenizer.json"))
    try:
        hf = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise VinaSmolError(f"{folder}: transformers cannot load the tokenizer ({exc})") from None
    for text in list(texts) + [unicodedata.normalize("NFD", t) for t in texts]:
        a = hf(text, add_special_tokens=False)["input_ids"]
        b = rust.encode(text, add_special_tokens=False).ids
        if a != b:
            raise VinaSmolError(f"{folder}: transformers and tokenizers disagree on {text[:40]!r}")
    if len(hf) != rust.get_vocab_size(with_added_tokens=True):
        raise VinaSmolError(f"{folder}: transformers sees {len(hf)} tokens, tokenizers "
                            f"{rust.get_vocab_size(with_added_tokens=True)}")
