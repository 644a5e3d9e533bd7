"""Before any step runs: every local file and every hub source is checked (a clear error naming the
source and the fix, never a traceback), and `vinasmol recipe check` prints the checks and the token
plan. No network: HF_HUB_OFFLINE is set; mirrors are written by the tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from flows.pipeline import plan_run, vinasmol
from tests.cli_helpers import run_vinasmol
from tests.model_fixtures import shared_tiny
from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.hub import MIRROR_ENV
from vinasmol_core.plan.hub_mirror import build_recipe_mirror
from vinasmol_core.plan.preflight import plan_tokens, require_inputs
from vinasmol_core.plan.recipe import HubSource, load_recipe

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "recipes" / "smollm2-360m-vi.yaml"
TINY = ROOT / "recipes" / "tiny-cpu.yaml"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    monkeypatch.setenv("VINASMOL_TIMING_LOG", str(tmp_path / "timing.jsonl"))


def _seed_mirror(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small mirror of every hub source of the production recipe, and a tiny model as its base."""
    recipe = load_recipe(SEED)
    # enough documents that the smallest budget's share (vi-instruct: 12M of vi's 1,462M) gets some
    docs = {lang: [{"id": f"{lang}-{i}", "text": f"{lang} document {i}"} for i in range(2000)]
            for lang in ("vi", "en", "code")}
    val = {lang: [{"id": f"{lang}-val-{i}", "text": f"{lang} held out {i}"} for i in range(5)]
           for lang in docs}
    model = shared_tiny(tmp_path_factory)["base"]
    build_recipe_mirror(recipe, root, docs, val, model, [recipe.base_model.source.repo])
    return root


def _files_recipe(tmp_path: Path) -> Path:
    data = yaml.safe_load(TINY.read_text())
    data["corpora"][0]["source"] = {"kind": "files", "train": [str(tmp_path / "missing-train.jsonl")]}
    path = tmp_path / "files.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_offline_hub_sources_fail_before_any_step_naming_source_and_fix(tmp_path: Path) -> None:
    with pytest.raises(VinaSmolError) as err:
        plan_run(SEED, store=(tmp_path / "store").as_uri())
    msg = str(err.value)
    assert msg.startswith("the recipe's inputs are not all readable (nothing was run)")
    assert "corpus viwiki: hub dataset wikimedia/wikipedia, config 20231101.vi, split train: unreach" in msg
    assert "hf download wikimedia/wikipedia --repo-type dataset" in msg and "--hub-mirror MIRROR" in msg
    assert "base model: hub model HuggingFaceTB/SmolLM2-360M @ main" in msg and "HF_HUB_OFFLINE=1" in msg
    assert not (tmp_path / "store").exists()  # the store was not even probed
    with pytest.raises(VinaSmolError, match="nothing was run"):
        vinasmol.fn(recipe=str(SEED))  # the flow's body checks first too (deployment runs)


def test_the_run_command_stops_before_any_step(monkeypatch, capsys, tmp_path: Path) -> None:
    recipe = _files_recipe(tmp_path)
    store = (tmp_path / "s").as_uri()
    code, out, err = run_vinasmol(monkeypatch, capsys, "run", str(recipe), "--store", store)
    assert code == 1 and "Traceback" not in err
    assert f"corpus sample-vi: file {tmp_path / 'missing-train.jsonl'} does not exist" in err
    assert not (tmp_path / "timing.jsonl").exists() and not (tmp_path / "s").exists()


def test_a_mirror_makes_the_production_recipe_readable(tmp_path: Path, tmp_path_factory) -> None:
    mirror = _seed_mirror(tmp_path / "mirror", tmp_path_factory)
    checks = require_inputs(load_recipe(SEED), mirror)
    assert {c.status for c in checks} == {"ok"} and len(checks) == 1 + 9 + 1  # model, sources, a val split
    plan = plan_run(SEED, store=(tmp_path / "store").as_uri(), hub_mirror=str(mirror), check_store=False)
    assert plan.hub_mirror == str(mirror.resolve())
    shutil.rmtree(mirror / "HuggingFaceFW" / "fineweb-edu")
    with pytest.raises(VinaSmolError, match=r"corpus fineweb-edu: .*not in the hub mirror"):
        require_inputs(load_recipe(SEED), mirror)


def test_recipe_check_prints_checks_and_the_token_plan(monkeypatch, capsys, tmp_path: Path,
                                                       tmp_path_factory) -> None:
    code, out, err = run_vinasmol(monkeypatch, capsys, "recipe", "check", str(SEED))
    assert code == 0, err
    hub = [c for c in load_recipe(SEED).corpora if isinstance(c.source, HubSource)]
    offline = [line for line in out.splitlines() if "not checked: offline" in line]
    assert len(offline) == len(hub) + 1 + 1  # each hub source, fineweb-2's test split, the base model
    assert "  eeve-6: 1,200.0M (vi 660.0M, en 480.0M, code 60.0M)" in out
    assert "  fineweb2-vi (vi, main): 1,170.0M / 1,170.0M" in out
    assert out.splitlines()[-1].startswith(f"ok: {SEED}: recipe 'smollm2-360m-vi'")
    mirror = _seed_mirror(tmp_path / "mirror", tmp_path_factory)
    args = ("recipe", "check", str(SEED), "--hub-mirror", str(mirror))
    code, out, _ = run_vinasmol(monkeypatch, capsys, *args)
    assert code == 0 and "not checked" not in out and out.count("in the hub mirror") == 11
    (mirror / "HuggingFaceTB" / "finemath" / "README.md").write_text("---\nconfigs: []\n---\n")
    shutil.rmtree(mirror / "wikimedia")
    code, out, err = run_vinasmol(monkeypatch, capsys, *args)
    assert code == 1 and "Traceback" not in err and "2 input(s) missing or unknown" in err
    assert "missing: corpus viwiki: hub dataset wikimedia/wikipedia" in out
    assert "missing: corpus en-annealing:" in out and "no README.md listing configs" in out


def test_recipe_check_refuses_missing_files(monkeypatch, capsys, tmp_path: Path) -> None:
    code, out, err = run_vinasmol(monkeypatch, capsys, "recipe", "check", str(_files_recipe(tmp_path)))
    missing = tmp_path / "missing-train.jsonl"
    assert code == 1 and f"missing: corpus sample-vi: file {missing} does not exist" in out
    assert "1 input(s) missing or unknown" in err


def test_budgets_of_the_production_recipe_add_up_to_its_token_plan() -> None:
    recipe = load_recipe(SEED)
    plans = plan_tokens(recipe)
    assert sum(p.tokens for p in plans) == sum(s.max_tokens for s in recipe.stages) == 2_700_000_000
    for corpus in recipe.corpora:
        planned = sum(p.sources.get(corpus.name) or 0 for p in plans)
        assert planned == pytest.approx(corpus.source.budget.tokens, rel=1e-6), corpus.name


def _hub_recipe(tmp_path: Path, **corpus: object) -> Path:
    """The tiny recipe with its Vietnamese corpus read from the hub dataset org/web (a mirror here)."""
    data = yaml.safe_load(TINY.read_text())
    data["corpora"][0] = {"name": "web-vi", "lang": "vi", "role": "main",
                          "source": {"kind": "hub", "dataset": "org/web", "config": "vie_Latn",
                                     "budget": {"documents": 50}}, **corpus}
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _web_mirror(root: Path, rows: list[dict]) -> list[Path]:
    from vinasmol_core.plan.hub_mirror import write_dataset_config

    return write_dataset_config(root / "org" / "web", "vie_Latn", {"train": rows}, shard_rows=4)


def test_a_text_field_the_dataset_lacks_is_named_before_the_run(tmp_path: Path) -> None:
    _web_mirror(tmp_path / "m", [{"id": str(i), "content": f"văn bản {i}"} for i in range(10)])
    with pytest.raises(VinaSmolError) as err:
        require_inputs(load_recipe(_hub_recipe(tmp_path)), tmp_path / "m")
    msg = str(err.value)
    assert "corpus web-vi: hub dataset org/web" in msg and "no column 'text' (columns: id, content)" in msg
    assert "set the corpus's text_field" in msg
    checks = require_inputs(load_recipe(_hub_recipe(tmp_path, text_field="content")), tmp_path / "m")
    assert "columns content read" in next(c.detail for c in checks if c.label == "corpus web-vi")


def test_a_truncated_parquet_shard_of_a_mirror_is_named_before_the_run(tmp_path: Path) -> None:
    shards = _web_mirror(tmp_path / "m", [{"id": str(i), "text": f"văn bản {i}"} for i in range(10)])
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(VinaSmolError, match=rf"corpus web-vi: .*shard {shards[1]} is not a readable parquet"):
        require_inputs(load_recipe(_hub_recipe(tmp_path)), tmp_path / "m")


def test_conversation_columns_are_checked_before_the_run(tmp_path: Path) -> None:
    turns = [{"role": "user", "content": "Xin chào?"}, {"role": "assistant", "content": "Chào bạn."}]
    _web_mirror(tmp_path / "m", [{"id": str(i), "conversation": turns} for i in range(10)])
    recipe = _hub_recipe(tmp_path, document={"kind": "messages"})
    with pytest.raises(VinaSmolError, match=r"no column 'messages' .*set the corpus's document columns"):
        require_inputs(load_recipe(recipe), tmp_path / "m")
    recipe = _hub_recipe(tmp_path, document={"kind": "messages", "field": "conversation",
                                             "labels": {"user": "User"}})
    with pytest.raises(VinaSmolError, match=r"turn 1: role 'assistant' has no label .*document.labels"):
        require_inputs(load_recipe(recipe), tmp_path / "m")
    recipe = _hub_recipe(tmp_path, document={"kind": "messages", "field": "conversation"})
    assert {c.status for c in require_inputs(load_recipe(recipe), tmp_path / "m")} == {"ok"}


def test_recipe_check_prints_planned_and_kept_tokens_per_source(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from vinasmol_core.common.manifests import DatasetManifest
    from vinasmol_core.store import ArtifactStore

    url = (tmp_path / "store").as_uri()
    args = ("recipe", "check", str(SEED), "--offline", "--store", url)
    code, out, _ = run_vinasmol(monkeypatch, capsys, *args)
    assert "  viwiki (vi, main): 200.0M / 200.0M\n" in out  # no dataset yet: the plan alone
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset.json").write_text("{}")
    stats = {"viwiki": {"planned_tokens": 200_000_000, "train_tokens": 164_100_000},
             "codeparrot": {"planned_tokens": 125_000_000, "train_tokens": 125_000_310}}
    ArtifactStore(url).publish(DatasetManifest(name="d", stats=stats), tmp_path / "ds", ref="datasets/main")
    code, out, _ = run_vinasmol(monkeypatch, capsys, *args)
    assert "/ budget / kept by the data step:" in out
    assert "  viwiki (vi, main): 200.0M / 200.0M / 164.1M\n" in out
    assert "  codeparrot (code, main): 125.0M / 125.0M / 125.0M\n" in out
    assert "  fineweb-edu (en, main): 1,005.0M / 1,005.0M / not prepared\n" in out
