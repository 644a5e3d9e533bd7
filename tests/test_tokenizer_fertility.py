"""Fertility report, the CLI's happy path with publishing, the tokenizer steps, and the
SmolLM2 tokenizer.json builder (on fake GGUF metadata: no download)."""

from __future__ import annotations

import json
import sys

import pytest
from tokenizers import Tokenizer

from tests.tokenizer_helpers import EXACT_TARGET, extended, sample_data, scratch, tiny_base
from vinasmol_core.tokenizer import fertility_report


def test_fertility_numbers_are_tokens_per_word_and_bytes_per_token() -> None:
    folder = scratch("fert")
    text = "Xin chào các bạn, hôm nay trời đẹp quá."
    path = folder / "one.jsonl"
    path.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    report = fertility_report({"base": tiny_base(), "extended": extended()}, {"vi": [path]}, floor=True)
    words, nbytes = len(text.split()), len(text.encode())
    for name, folder_ in (("base", tiny_base()), ("extended", extended())):
        n = len(Tokenizer.from_file(str(folder_ / "tokenizer.json")).encode(text, add_special_tokens=False))
        cell = report.cells["vi"][name]
        assert cell.tokens == n
        assert cell.tokens_per_word == pytest.approx(n / words)
        assert cell.bytes_per_token == pytest.approx(nbytes / n)
    floor = report.languages["vi"].floor_tokens_per_word
    assert floor is not None and floor <= report.cells["vi"]["extended"].tokens_per_word
    data = report.to_json()
    assert data["languages"]["vi"]["words"] == words
    assert set(data["languages"]["vi"]["tokenizers"]) == {"base", "extended"}
    md = report.to_markdown()
    assert md.startswith("| language | words | base tok/word | extended tok/word")
    assert "| vi | 9 |" in md


def test_cli_extend_publishes_manifest_with_fertility(monkeypatch, capsys) -> None:  # noqa: ANN001
    from vinasmol_core.cli import main
    from vinasmol_core.common.manifests import TokenizerManifest
    from vinasmol_core.store import ArtifactStore

    folder = scratch("cli-ok")
    store = (folder / "store").as_uri()
    data = {lang: _small_copy(path, folder) for lang, path in sample_data().items()}
    monkeypatch.setattr(sys, "argv", [
        "vinasmol", "tokenizer", "extend", "--base", str(tiny_base()), "--corpus", str(sample_data()["vi"]),
        "--target-vocab-size", str(EXACT_TARGET), "--out", str(folder / "tok"), "--store", store,
        "--ref", "tokenizers/vi", "--eval", f"vi={data['vi']}", "--eval", f"en={data['en']}",
        "--eval", f"code={data['code']}",
    ])
    main()
    out = capsys.readouterr().out
    assert "1,024 -> 1,088" in out
    assert (folder / "tok" / "tokenizer.json").read_bytes() == (extended() / "tokenizer.json").read_bytes()
    manifest = ArtifactStore(store).get_manifest("tokenizers/vi")
    assert isinstance(manifest, TokenizerManifest)
    assert (manifest.vocab_size, manifest.base_vocab_size, manifest.target_vocab_size) == (1088, 1024, 1088)
    assert set(manifest.fertility["languages"]) == {"vi", "en", "code"}
    assert "| vi |" in manifest.fertility_markdown
    assert set(manifest.files) >= {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["vinasmol", "tokenizer", "report", "--tokenizer", f"base={tiny_base()}",
                                      "--tokenizer", f"ext={folder / 'tok'}", "--data", f"vi={data['vi']}",
                                      "--json", str(folder / "r.json")])
    main()
    assert json.loads((folder / "r.json").read_text())["languages"]["vi"]["tokenizers"]["ext"]["tokens"] > 0


def test_tokenizer_steps_publish_counts_and_tokenizer() -> None:
    from tasks.tokenizer import merge_vocabulary, train_tokenizer
    from vinasmol_core.plan.recipe import CorpusSpec, TokenizerSection
    from vinasmol_core.store import ArtifactStore

    folder = scratch("tasks")
    url = (folder / "store").as_uri()
    store = ArtifactStore(url)
    base = store.publish(_tokenizer_manifest_for_base(), tiny_base(), ref="base/tokenizer")
    corpus = CorpusSpec(name="vi", lang="vi", source={"kind": "files", "train": [str(sample_data()["vi"])]})
    section = TokenizerSection(target_vocab_size=EXACT_TARGET)
    counts = train_tokenizer.fn(base_model="base/tokenizer", corpora=[corpus], corpus_digests={"vi": "d"},
                                section=section, store_url=url)
    assert counts.extra["content"] == "word-counts" and counts.stats["vietnamese_letters"] > 0
    assert counts.source_digests == {"vi": "d"} and counts.parents == [base.digest]
    tok = merge_vocabulary.fn(base_model="base/tokenizer", word_counts=counts.digest, section=section,
                              eval_corpora=[corpus], store_url=url)
    assert tok.vocab_size == EXACT_TARGET and tok.fertility["languages"]["vi"]["words"] > 0
    assert tok.parents == [base.digest, counts.digest]


def _small_copy(path, folder):  # noqa: ANN001, ANN202
    """The first 20 documents, each cut to 2,000 characters (a quick fertility report)."""
    from tests.tokenizer_helpers import read_docs

    out = folder / path.name
    out.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n"
                          for d in read_docs(path, limit=20, max_chars=2000)), encoding="utf-8")
    return out


def _tokenizer_manifest_for_base():  # noqa: ANN202
    from vinasmol_core.common.manifests import TokenizerManifest

    return TokenizerManifest(name="tiny-base", vocab_size=1024, base_vocab_size=1024)


def test_smollm2_tokenizer_json_from_gguf_metadata() -> None:
    from vinasmol_core.builtin.smollm2 import (
        smollm2_135m_config,
        smollm2_tokenizer_json,
        write_smollm2_tokenizer_config,
    )
    from vinasmol_core.tokenizer.text import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet, "Ġt", "Ġth", "he"]
    fields = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3),
        "tokenizer.ggml.merges": ["Ġ t", "Ġt h", "h e"],
    }
    data = smollm2_tokenizer_json(fields)
    assert [t["content"] for t in data["added_tokens"]] == tokens[:3]
    assert data["pre_tokenizer"]["pretokenizers"][0] == {"type": "Digits", "individual_digits": True}
    assert data["model"]["merges"][1] == ["Ġt", "h"]
    tok = Tokenizer.from_str(json.dumps(data))
    assert tok.encode(" th 12").tokens == ["Ġth", "Ġ", "1", "2"]
    folder = scratch("smol")
    write_smollm2_tokenizer_config(folder, data)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["bos_token"] == config["eos_token"] == config["unk_token"] == "<|endoftext|>"
    hp = {"llama.embedding_length": 576, "llama.attention.head_count": 9, "llama.feed_forward_length": 1536,
          "llama.block_count": 30, "llama.attention.head_count_kv": 3, "llama.context_length": 8192,
          "llama.rope.freq_base": 100000.0}
    cfg = smollm2_135m_config(hp, 49152)
    assert cfg["tie_word_embeddings"] and cfg["head_dim"] == 64 and cfg["rope_theta"] == 100000.0
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == 0
