"""The model steps as tasks over a store: typed requests in, published manifests out."""

from __future__ import annotations

import json

import pytest

from tasks import model as model_tasks
from tests.model_fixtures import shared_tiny
from vinasmol_core.builtin.tiny import build_tiny_tokenizer
from vinasmol_core.errors import VinaSmolError
from vinasmol_core.manifests import CheckpointManifest, EvalReportManifest, TokenizerManifest
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


def test_steps_publish_typed_artifacts(tiny, store_url, tmp_path):
    store = ArtifactStore(store_url)
    base = model_tasks.fetch_base_model(
        model_tasks.FetchBaseRequest(source=str(tiny["base"]), store_url=store_url, out_ref="t/base")
    )
    assert isinstance(base, CheckpointManifest) and base.format == "hf" and "model.safetensors" in base.files
    _publish_tokenizer(store, tiny["ext_tok"], "t/tokenizer")
    ext = model_tasks.init_embeddings(
        model_tasks.InitEmbeddingsRequest(
            base_model="t/base", tokenizer="t/tokenizer", store_url=store_url, out_ref="t/extended"
        )
    )
    assert ext.format == "hf" and ext.model_config_["vocab_size"] > base.model_config_["vocab_size"]
    assert ext.extra["extension"]["init"] == "subword-mean"
    assert ext.parents == [store.resolve("t/base"), store.resolve("t/tokenizer")]
    lit = model_tasks.convert_to_litgpt(
        model_tasks.ConvertRequest(hf_model="t/extended", store_url=store_url, out_ref="t/litgpt")
    )
    assert lit.format == "litgpt" and lit.model_config_["vocab_size"] == ext.model_config_["vocab_size"]
    assert lit.tokenizer_digest == ext.tokenizer_digest
    hf = model_tasks.export(
        model_tasks.ExportRequest(checkpoint="t/litgpt", dtype="float32", store_url=store_url, out_ref="t/hf")
    )
    assert hf.format == "hf" and "README.md" in hf.files
    val = tmp_path / "vi.jsonl"
    val.write_text(json.dumps({"text": "Hà Nội là thủ đô của Việt Nam."}, ensure_ascii=False) + "\n")
    report = model_tasks.evaluate(
        model_tasks.EvaluateRequest(
            checkpoint="t/hf", files={"vi": [str(val)]}, seq_len=64, store_url=store_url
        )
    )
    assert isinstance(report, EvalReportManifest) and report.metrics["bpb"]["vi"] > 0
    assert report.model_digest == store.resolve("t/hf")


def test_bad_tokenizer_publishes_nothing(tiny, store_url, tmp_path):
    store = ArtifactStore(store_url)
    model_tasks.fetch_base_model(
        model_tasks.FetchBaseRequest(source=str(tiny["base"]), store_url=store_url, out_ref="t/base")
    )
    small = build_tiny_tokenizer(tmp_path / "small", vocab_size=300)
    _publish_tokenizer(store, small, "t/small")
    before = set(store.list_manifests())
    with pytest.raises(VinaSmolError, match="smaller"):
        model_tasks.init_embeddings(
            model_tasks.InitEmbeddingsRequest(
                base_model="t/base", tokenizer="t/small", store_url=store_url, out_ref="t/extended"
            )
        )
    assert set(store.list_manifests()) == before
    assert "t/extended" not in store.list_refs()


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
