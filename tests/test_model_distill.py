"""The `distill` embedding init on the tiny model: only new rows change, the loss falls, a seed fixes
the result, and the recipe field is validated."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.model_fixtures import build_tiny_setup
from vinasmol_core.builtin.sample_corpus import sample_texts
from vinasmol_core.common.errors import ConfigError
from vinasmol_core.model import extend_model
from vinasmol_core.model.distill import Distiller, DistillSettings, evaluate_loss, text_windows
from vinasmol_core.model.embeddings import load_tokenizer, segment_tokens
from vinasmol_core.model.parity import load_hf_model

SETTINGS = DistillSettings(tokens=3000, seq_len=64, batch_size=4, lr=1e-2, layers=1, seed=3, log_every=5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("distill")
    paths = build_tiny_setup(root)
    corpus = [([{"text": t} for t in sample_texts("vi", 150)], 0.7),
              ([{"text": t} for t in sample_texts("en", 60)], 0.3)]
    paths["mean"] = extend_model(paths["base"], paths["ext_tok"], root / "mean")
    lines: list[str] = []
    paths["distill"] = extend_model(
        paths["base"], paths["ext_tok"], root / "distill", init="distill", corpus=corpus, distill=SETTINGS,
        log=lines.append,
    )
    return {**paths, "corpus": corpus, "root": root, "lines": lines}


def _weights(path) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return load_file(str(path / "model.safetensors"))


def test_distill_changes_only_new_rows(setup: dict) -> None:
    base, mean, dist = _weights(setup["base"]), _weights(setup["mean"]), _weights(setup["distill"])
    key = "model.embed_tokens.weight"
    n_base = base[key].shape[0]
    assert set(dist) == set(mean)
    for name, tensor in dist.items():
        if name == key:
            assert torch.equal(tensor[:n_base], base[key])
            assert not torch.equal(tensor[n_base:], mean[key][n_base:])
        else:
            assert torch.equal(tensor, base[name]), name
    assert any("tok/s" in line and "loss" in line for line in setup["lines"])


def test_distill_lowers_the_loss(setup: dict) -> None:
    new_tok = load_tokenizer(setup["ext_tok"])
    n_base = load_tokenizer(setup["tok"]).get_vocab_size()
    held_out = [([{"text": t} for t in sample_texts("vi", 200)[150:]], 1.0)]
    windows, _ = text_windows(new_tok, held_out, 1500, 64)
    segments = segment_tokens(load_tokenizer(setup["tok"]), new_tok, range(n_base, new_tok.get_vocab_size()))
    distiller = Distiller(load_hf_model(setup["base"]), n_base, segments, eot=0, layers=SETTINGS.layers)
    key = "model.embed_tokens.weight"
    mean_rows = _weights(setup["mean"])[key][n_base:]
    dist_rows = _weights(setup["distill"])[key][n_base:]
    before = evaluate_loss(distiller, windows, mean_rows)
    after = evaluate_loss(distiller, windows, dist_rows)
    assert after < 0.9 * before, (before, after)


def test_distill_is_deterministic_for_a_seed(setup: dict) -> None:
    again = extend_model(setup["base"], setup["ext_tok"], setup["root"] / "again", init="distill",
                         corpus=setup["corpus"], distill=SETTINGS)
    other = extend_model(setup["base"], setup["ext_tok"], setup["root"] / "other", init="distill",
                         corpus=setup["corpus"], distill=DistillSettings(**{**SETTINGS.__dict__, "seed": 4}))
    key = "model.embed_tokens.weight"
    assert torch.equal(_weights(again)[key], _weights(setup["distill"])[key])
    assert not torch.equal(_weights(other)[key], _weights(setup["distill"])[key])


def test_distill_needs_text(setup: dict) -> None:
    with pytest.raises(ConfigError, match="corpus"):
        extend_model(setup["base"], setup["ext_tok"], setup["root"] / "none", init="distill")
    with pytest.raises(ConfigError, match="distill.tokens"):
        DistillSettings(tokens=0)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("embedding_init.method=distil", r"embedding_init\.method: Input should be 'subword-mean'"),
        ("embedding_init.distill.tokens=0", r"embedding_init\.distill\.tokens: Input should be greater"),
        ("embedding_init.distill.lr=-1", r"embedding_init\.distill\.lr: Input should be greater than 0"),
        ("embedding_init.distill.languages={vi: 0}", r"embedding_init\.distill\.languages\.vi"),
    ],
)
def test_recipe_distill_fields_are_validated(line: str, message: str) -> None:
    from pathlib import Path

    from vinasmol_core.plan.recipe import load_recipe

    tiny = Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu.yaml"
    with pytest.raises(ConfigError, match=message):
        load_recipe(tiny, [line])
    recipe = load_recipe(tiny, ["embedding_init.method=distill", "embedding_init.distill.tokens=4096"])
    assert recipe.embedding_init.distill.tokens == 4096


def test_task_and_cli_run_distill_on_training_text(setup: dict, tmp_path, monkeypatch, capsys) -> None:
    import json

    from tasks import model as model_tasks
    from tests.cli_helpers import run_vinasmol
    from vinasmol_core.common.manifests import TokenizerManifest
    from vinasmol_core.plan.recipe import CorpusSpec, EmbeddingInitSection, HFBase
    from vinasmol_core.store import ArtifactStore

    monkeypatch.setenv("VINASMOL_CACHE", str(tmp_path / "cache"))
    store_url = f"file://{tmp_path / 'store'}"
    store = ArtifactStore(store_url)
    source = HFBase(path=str(setup["base"]))
    base = model_tasks.fetch_base_model.fn(source=source, name="b", store_url=store_url)
    size = load_tokenizer(setup["ext_tok"]).get_vocab_size()
    tok = store.publish(TokenizerManifest(vocab_size=size, base_vocab_size=512), setup["ext_tok"]).digest
    vi = CorpusSpec(name="v", lang="vi", source={"kind": "sample", "docs": 40, "val_docs": 5, "seed": 1})
    section = EmbeddingInitSection(
        method="distill", distill={"tokens": 600, "seq_len": 64, "languages": {"vi": 1}}
    )
    ext = model_tasks.init_embeddings.fn(base_model=base.digest, tokenizer=tok, section=section,
                                         store_url=store_url, corpora=[vi], corpus_digests={"v": "x"})
    info = ext.extra["extension"]
    assert info["init"] == "distill" and info["distill"]["tokens"] == 600
    with pytest.raises(Exception, match="embedding_init.distill.languages"):
        model_tasks.init_embeddings.fn(base_model=base.digest, tokenizer=tok, section=section,
                                       store_url=store_url, corpora=[])

    text = tmp_path / "vi.jsonl"
    rows = [json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in sample_texts("vi", 30)]
    text.write_text("".join(rows))
    code, out, err = run_vinasmol(
        monkeypatch, capsys, "model", "extend", "--base", str(setup["base"]),
        "--tokenizer", str(setup["ext_tok"]), "--out", str(tmp_path / "cli"), "--init", "distill",
        "--corpus", str(text), "--distill-tokens", "300", "--seed", "1",
    )
    assert code == 0, err
    assert "distill step" in out and "(distill, 300 tokens" in out
