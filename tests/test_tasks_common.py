"""Cache keys of pipeline steps: what enters them and what never does."""

from __future__ import annotations

from tasks import common
from tasks.common import step_cache_key, store_root
from vinasmol_core.plan.recipe import load_recipe
from vinasmol_core.train.spec import StageSpec

SPEC = load_recipe("recipes/tiny-cpu.yaml").stages[2]


def key(**kwargs):
    base = {"spec": SPEC, "init_checkpoint": "a" * 64, "dataset": "b" * 64, "store_url": "file:///x"}
    return step_cache_key("train-stage", {**base, **kwargs})


def test_store_and_debugging_switches_stay_out_of_the_key() -> None:
    assert key() == key(store_url="s3://elsewhere/store")
    assert key() == key(fail_at_step=5)
    assert key() == key(stage_runner="deployment")


def test_inputs_recipe_section_and_name_change_the_key() -> None:
    assert key() != key(init_checkpoint="c" * 64)
    assert key() != key(dataset="d" * 64)
    assert key() != key(spec=StageSpec.model_validate({**SPEC.model_dump(), "lr": SPEC.lr * 2}))
    args = {"spec": SPEC, "init_checkpoint": "a" * 64, "dataset": "b" * 64}
    assert step_cache_key("train-stage", args) != step_cache_key("evaluate", args)


def test_code_version_changes_the_key(monkeypatch) -> None:
    before = key()
    monkeypatch.setattr(common, "CODE_VERSION", common.CODE_VERSION + "-next")
    assert key() != before


def test_key_is_stable_across_processes_and_argument_order() -> None:
    a = step_cache_key("prepare-data", {"role": "main", "section": {"dedup": True, "val_fraction": 0.1}})
    b = step_cache_key("prepare-data", {"section": {"val_fraction": 0.1, "dedup": True}, "role": "main"})
    assert a == b and a.startswith("prepare-data-") and len(a) == len("prepare-data-") + 64


def test_a_typed_recipe_section_keys_like_its_json() -> None:
    """Steps take their recipe section as a Pydantic model; the key is that of its JSON data."""
    from vinasmol_core.plan.recipe import DataSection

    section = DataSection(val_fraction=0.1)
    assert step_cache_key("prepare-data", {"section": section}) == step_cache_key(
        "prepare-data", {"section": section.model_dump(mode="json")}
    )


def test_store_root_normalises_local_paths(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert store_root("file://./s/") == "file://" + str(tmp_path / "s")
    assert store_root("s") == "file://" + str(tmp_path / "s")
    assert store_root("s3://bucket/p/") == "s3://bucket/p"


def test_data_step_is_keyed_on_tokenizer_content_not_its_carrier() -> None:
    """A checkpoint carrying the same tokenizer.json as the tokenizer artifact reuses the dataset."""
    from tasks.data import prepare_data
    from vinasmol_core.plan.recipe import DataSection

    policy = prepare_data.cache_policy
    args = {
        "role": "annealing", "corpus_digests": {}, "corpora": [], "section": DataSection(),
        "tokenizer_sha": "t" * 64,
    }
    a = policy.compute_key(None, {**args, "tokenizer_artifact": "tokenizer-digest"}, {})
    b = policy.compute_key(None, {**args, "tokenizer_artifact": "checkpoint-digest"}, {})
    c = policy.compute_key(None, {**args, "tokenizer_sha": "u" * 64, "tokenizer_artifact": "x"}, {})
    assert a == b != c
