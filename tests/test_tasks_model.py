"""The model steps over a store (their plain functions, `.fn`): digests and typed recipe sections in,
published manifests out."""

from __future__ import annotations

import json

import pytest

from tasks import model as model_tasks
from tests.model_fixtures import shared_tiny
from vinasmol_core.builtin.tiny import build_tiny_tokenizer
from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.common.manifests import CheckpointManifest, EvalReportManifest, TokenizerManifest
from vinasmol_core.plan.recipe import CorpusSpec, EmbeddingInitSection, EvalSection, ExportSection, HFBase
from vinasmol_core.store import ArtifactStore


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny(tmp_path_factory)


@pytest.fixture
def store_url(tmp_path, monkeypatch):
    monkeypatch.setenv("VINASMOL_CACHE", str(tmp_path / "cache"))
    return f"file://{tmp_path / 'store'}"


def _publish_tokenizer(store: ArtifactStore, tok_dir, ref: str) -> str:
    from tokenizers import Tokenizer

    size = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()
    manifest = store.publish(TokenizerManifest(vocab_size=size, base_vocab_size=512), tok_dir, ref=ref)
    return manifest.digest


def _fetch_base(tiny, store_url) -> CheckpointManifest:
    source = HFBase(path=str(tiny["base"]))
    return model_tasks.fetch_base_model.fn(source=source, name="b", store_url=store_url)


def test_steps_publish_typed_artifacts(tiny, store_url, tmp_path):
    store = ArtifactStore(store_url)
    base = _fetch_base(tiny, store_url)
    assert isinstance(base, CheckpointManifest) and base.format == "hf" and "model.safetensors" in base.files
    assert model_tasks.fetch_base_model.fn(
        source=HFBase(path=f"store:{base.digest}"), name="b", store_url=store_url
    ).digest == base.digest
    tok = _publish_tokenizer(store, tiny["ext_tok"], "t/tokenizer")
    ext = model_tasks.init_embeddings.fn(
        base_model=base.digest, tokenizer=tok, section=EmbeddingInitSection(), store_url=store_url
    )
    assert ext.format == "hf" and ext.model_config_["vocab_size"] > base.model_config_["vocab_size"]
    assert ext.extra["extension"]["init"] == "subword-mean"
    assert ext.parents == [base.digest, tok]
    lit = model_tasks.convert_to_litgpt.fn(hf_model=ext.digest, litgpt_name=None, store_url=store_url)
    assert lit.format == "litgpt" and lit.model_config_["vocab_size"] == ext.model_config_["vocab_size"]
    assert lit.tokenizer_digest == ext.tokenizer_digest
    hf = model_tasks.export.fn(
        checkpoint=lit.digest, section=ExportSection(name="t", dtype="float32"), store_url=store_url
    )
    assert hf.format == "hf" and "README.md" in hf.files and hf.stage == "export"
    val = tmp_path / "vi.jsonl"
    val.write_text(json.dumps({"text": "Hà Nội là thủ đô của Việt Nam."}, ensure_ascii=False) + "\n")
    corpus = CorpusSpec(name="v", lang="vi", source={"kind": "files", "train": [str(val)]})
    report = model_tasks.evaluate.fn(
        checkpoint=hf.digest, label="hf", section=EvalSection(seq_len=64, languages=["vi"]),
        eval_corpora=[corpus], store_url=store_url,
    )
    assert isinstance(report, EvalReportManifest) and report.metrics["bpb"]["vi"] > 0
    assert report.model_digest == hf.digest and report.name == "eval-hf"


def test_bad_tokenizer_publishes_nothing(tiny, store_url, tmp_path):
    store = ArtifactStore(store_url)
    base = _fetch_base(tiny, store_url)
    small = build_tiny_tokenizer(tmp_path / "small", vocab_size=300)
    tok = _publish_tokenizer(store, small, "t/small")
    before = set(store.list_manifests())
    with pytest.raises(VinaSmolError, match="smaller"):
        model_tasks.init_embeddings.fn(
            base_model=base.digest, tokenizer=tok, section=EmbeddingInitSection(), store_url=store_url
        )
    assert set(store.list_manifests()) == before


def test_base_model_from_the_store_must_be_an_hf_checkpoint(tiny, store_url):
    tok = _publish_tokenizer(ArtifactStore(store_url), tiny["ext_tok"], "t/tokenizer")
    with pytest.raises(VinaSmolError, match="not an hf checkpoint"):
        model_tasks.fetch_base_model.fn(source=HFBase(path=f"store:{tok}"), name="b", store_url=store_url)


def test_cli_export_from_a_store_ref(tiny, store_url, tmp_path):
    from typer.testing import CliRunner

    from vinasmol_core.cli import app
    from vinasmol_core.model import publish_checkpoint

    publish_checkpoint(ArtifactStore(store_url), tiny["lit"], "litgpt", ref="t/lit")
    out = tmp_path / "hf"
    res = CliRunner().invoke(
        app,
        [
            "export",
            "t/lit",
            "--store",
            store_url,
            "--out",
            str(out),
            "--publish",
            "t/hf",
            "--dtype",
            "float32",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").is_file()
    manifest = ArtifactStore(store_url).get_manifest("t/hf")
    assert manifest.format == "hf" and manifest.stage == "export"
