"""Recipe model: the shipped recipes validate, errors name the field, CLI schema/check."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.cli_helpers import run_vinasmol
from vinasmol_core.common.errors import ConfigError
from vinasmol_core.common.steps import STEPS_BEFORE
from vinasmol_core.plan.recipe import (
    LongEvalSection,
    apply_overrides,
    load_recipe,
    override_path,
    parse_recipe,
    recipe_schema,
)

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny-cpu.yaml"
SEED = ROOT / "recipes" / "smollm2-360m-vi.yaml"


def tiny_data() -> dict:
    return yaml.safe_load(TINY.read_text())


def test_seed_recipe_has_the_seed_numbers() -> None:
    r = load_recipe(SEED)
    assert r.tokenizer.target_vocab_size == 55936
    assert [s.name for s in r.stages] == [
        "eeve-3",
        "eeve-4",
        "eeve-6",
        "eeve-7",
        "context-extension",
        "annealing",
    ]
    by = {s.name: s for s in r.stages}
    assert [by[n].trainable for n in ("eeve-3", "eeve-4", "eeve-6", "eeve-7")] == [
        "new-embeddings",
        "embeddings",
        "all",
        "transformer",
    ]
    assert [by[n].lr for n in ("eeve-3", "eeve-4", "eeve-6", "eeve-7", "annealing")] == [
        1e-3,
        5e-4,
        2e-4,
        1e-4,
        1e-4,
    ]
    assert [by[n].max_tokens for n in ("eeve-3", "eeve-4", "eeve-6", "eeve-7", "annealing")] == [
        200_000_000,
        200_000_000,
        1_200_000_000,
        400_000_000,
        500_000_000,
    ]
    assert by["annealing"].min_lr == 0.0 and by["eeve-3"].min_lr == 1e-5
    ctx = by["context-extension"]
    assert (ctx.seq_len, ctx.block_size, ctx.rope_base) == (8192, 8192, 100000.0)
    for s in r.stages[:4]:
        assert (s.global_batch, s.micro_batch, s.seq_len, s.warmup_steps) == (64, 2, 2048, 10)
        assert (s.weight_decay, tuple(s.betas), s.grad_clip, s.precision) == (
            0.1,
            (0.9, 0.95),
            1.0,
            "bf16-mixed",
        )
        assert s.mixture == {"vi": 0.55, "en": 0.40, "code": 0.05}
        assert s.checkpoint_interval == 100
    assert by["annealing"].mixture == {"vi": 0.32, "en": 0.25, "code": 0.03, "annealing": 0.40}
    assert r.stage_dataset(by["annealing"]) == "annealing"
    assert r.stage_dataset(by["eeve-6"]) == "main"


def test_tiny_recipe_runs_every_stage_on_cpu() -> None:
    r = load_recipe(TINY)
    assert r.base_model.source.kind == "tiny"
    assert {c.source.kind for c in r.corpora} == {"sample"}
    assert [s.name for s in r.stages] == [s.name for s in load_recipe(SEED).stages]
    assert all(s.accelerator == "cpu" for s in r.stages)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["stages"][2].__setitem__("lr", -1), "stages.2.lr"),
        (lambda d: d["stages"][0].__setitem__("trainable", "everything"), "stages.0.trainable"),
        (lambda d: d["stages"][1].__setitem__("name", "eeve-3"), "stages.1.name"),
        (lambda d: d["stages"][0].__setitem__("mixture", {"fr": 1.0}), "stages.0.mixture"),
        (lambda d: d["stages"][0].__setitem__("mixture", "nope"), "stages.0.mixture"),
        (lambda d: d["tokenizer"].__setitem__("target_vocab_size", "big"), "tokenizer.target_vocab_size"),
        (lambda d: d["tokenizer"].__setitem__("target_vocab_size", 1200), "tokenizer.target_vocab_size"),
        (lambda d: d["corpora"][0].__setitem__("lang", "fr"), "corpora.0.lang"),
        (lambda d: d["base_model"]["source"].__setitem__("kind", "gguf"), "base_model.source"),
        (lambda d: d.__setitem__("stagez", []), "stagez"),
        (lambda d: d["stages"][0].__setitem__("min_lr", 1.0), "stages.0"),
        (lambda d: d["eval"]["long"].__setitem__("after", ["eeve-5"]), "eval.long.after"),
        (lambda d: d["eval"]["harness"].__setitem__("after", ["nope"]), "eval.harness.after"),
        (lambda d: d["eval"]["long"].__setitem__("depths", [1.5]), "eval.long.depths.0"),
        (lambda d: d["eval"]["harness"].update(tasks=[], cloze=[]), "eval.harness"),
    ],
)
def test_invalid_recipe_names_the_field(mutate, field: str) -> None:
    data = tiny_data()
    mutate(data)
    with pytest.raises(ConfigError) as info:
        parse_recipe(data, "r.yaml")
    assert field in str(info.value), str(info.value)


def test_eval_section_per_checkpoint() -> None:
    """Long-context and harness checks only for the checkpoints the recipe names; the others' sections
    (and so their cache keys) do not change with those settings."""
    r = load_recipe(TINY)
    assert r.eval.for_label("context-extension").long.length == 256
    assert r.eval.for_label("eeve-3").long.after == [] and r.eval.for_label("eeve-3").harness.after == []
    other = r.eval.model_copy(update={"long": LongEvalSection(after=["annealing"], length=999)})
    assert other.for_label("eeve-3") == r.eval.for_label("eeve-3")
    assert other.for_label("annealing") != r.eval.for_label("annealing")
    assert r.eval.for_label("annealing").harness.task_names() == ["vinasmol_cloze_vi"]
    assert r.eval.for_label("eeve-7").harness.after == []
    assert r.eval.for_label("eeve-7").long.after == []


def test_unknown_stage_is_refused_with_the_list() -> None:
    r = load_recipe(TINY)
    with pytest.raises(ConfigError, match="unknown stage 'eeve-5'.*eeve-6"):
        r.steps_from(["eeve-5"])
    assert r.steps_from(["eeve-7"]) == {"eeve-7", "context-extension", "annealing", "evaluate", "export"}


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")


def test_schema_describes_sections() -> None:
    """The schema types each section, lists what a recipe must give, and keeps the fields' descriptions."""
    schema = recipe_schema()
    defs, props = schema["$defs"], schema["properties"]
    assert schema["title"] == "Recipe" and schema["type"] == "object"
    assert schema["additionalProperties"] is False  # an unknown section is an error, not ignored
    assert set(schema["required"]) == {"name", "base_model", "corpora", "stages"}
    sections = {
        "tokenizer": "TokenizerSection",
        "embedding_init": "EmbeddingInitSection",
        "data": "DataSection",
        "eval": "EvalSection",
        "export": "ExportSection",
        "compute": "ComputeSection",
        "store": "StoreSection",
    }
    for name, model in sections.items():
        assert props[name] == {"$ref": f"#/$defs/{model}"}, name
        section = defs[model]
        assert section["type"] == "object" and section["additionalProperties"] is False, name
        assert "required" not in section, name  # every optional section has full defaults
    assert props["name"]["type"] == "string" and props["name"]["pattern"] == "^[A-Za-z0-9][A-Za-z0-9._-]*$"
    assert props["corpora"] == {"items": {"$ref": "#/$defs/CorpusSpec"}, "minItems": 1, "title": "Corpora",
                                "type": "array"}
    assert props["stages"]["items"] == {"$ref": "#/$defs/StageSpec"} and props["stages"]["minItems"] == 1
    assert props["mixtures"]["additionalProperties"]["additionalProperties"] == {"type": "number"}
    assert "stage's `mixture`" in props["mixtures"]["description"]

    corpus = defs["CorpusSpec"]
    assert set(corpus["required"]) == {"name", "lang", "source"}
    assert corpus["properties"]["lang"]["enum"] == ["vi", "en", "code"]
    assert corpus["properties"]["role"] == {"default": "main", "enum": ["main", "annealing"], "title": "Role",
                                            "type": "string"}
    assert defs["BaseModelSpec"]["properties"]["source"]["discriminator"] == {
        "mapping": {
            "hf": "#/$defs/HFBase",
            "hub": "#/$defs/HubBase",
            "smollm2-135m": "#/$defs/SmolLM2Base",
            "tiny": "#/$defs/TinyBase",
        },
        "propertyName": "kind",
    }
    assert defs["HFBase"]["required"] == ["path"] and "store:" in defs["HFBase"]["properties"]["path"][
        "description"]
    assert defs["HubBase"]["required"] == ["repo"]
    assert defs["HubBase"]["properties"]["revision"]["default"] == "main"
    assert set(defs["HubSource"]["required"]) == {"dataset", "budget"}
    assert set(corpus["properties"]["source"]["discriminator"]["mapping"]) == {"sample", "files", "hub"}
    tok = defs["TokenizerSection"]["properties"]["target_vocab_size"]
    assert (tok["type"], tok["default"], tok["exclusiveMinimum"]) == ("integer", 55936, 0)
    assert defs["EmbeddingInitSection"]["properties"]["blend"] == {
        "default": 0.5, "maximum": 1, "minimum": 0, "title": "Blend", "type": "number"}

    stage = defs["StageSpec"]
    assert stage["required"] == ["name"]  # the rest may come from stage_defaults
    assert {"type": "string"} in stage["properties"]["mixture"]["anyOf"]  # or a named mixture
    sp = stage["properties"]
    assert (sp["lr"]["type"], sp["lr"]["exclusiveMinimum"]) == ("number", 0)
    assert (sp["warmup_steps"]["type"], sp["warmup_steps"]["minimum"]) == ("integer", 0)
    assert sp["trainable"]["anyOf"][0]["enum"] == ["new-embeddings", "embeddings", "all", "transformer"]
    assert "sequences per optimizer step" in sp["global_batch"]["description"]
    assert "one device" in sp["micro_batch"]["description"]
    assert "steps = max_tokens" in sp["max_tokens"]["description"]


def _schema_errors(data: object) -> list[tuple[str, str]]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(recipe_schema())
    return sorted((".".join(map(str, e.absolute_path)), e.message) for e in validator.iter_errors(data))


def test_schema_validates_a_complete_recipe_and_rejects_bad_fields() -> None:
    """A recipe with every stage spelled out (what the model itself dumps) passes the schema; each bad
    field is reported at its own path."""
    full = load_recipe(TINY).model_dump(mode="json")
    assert _schema_errors(full) == []

    def broken(mutate) -> list[tuple[str, str]]:  # noqa: ANN001
        data = json.loads(json.dumps(full))
        mutate(data)
        return _schema_errors(data)

    assert broken(lambda d: d.pop("name")) == [("", "'name' is a required property")]
    assert broken(lambda d: d["corpora"][0].__setitem__("lang", "fr")) == [
        ("corpora.0.lang", "'fr' is not one of ['vi', 'en', 'code']")]
    assert broken(lambda d: d["stages"][2].__setitem__("lr", 0)) == [
        ("stages.2.lr", "0 is less than or equal to the minimum of 0")]
    assert [path for path, _ in broken(lambda d: d.__setitem__("stagez", []))] == [""]
    assert "stagez" in broken(lambda d: d.__setitem__("stagez", []))[0][1]


@pytest.mark.parametrize("path", [TINY, SEED], ids=["tiny", "seed"])
def test_schema_accepts_the_shipped_recipes(path: Path) -> None:
    """Stages leave fields to stage_defaults and name mixtures: the schema takes recipes as written."""
    assert _schema_errors(yaml.safe_load(path.read_text())) == []


def test_cli_recipe_schema_and_check(monkeypatch, capsys, tmp_path: Path) -> None:
    code, out, _ = run_vinasmol(monkeypatch, capsys, "recipe", "schema")
    assert code == 0 and json.loads(out) == recipe_schema()
    code, out, _ = run_vinasmol(monkeypatch, capsys, "recipe", "check", str(TINY))
    steps = load_recipe(TINY).step_names()
    assert steps[:6] == list(STEPS_BEFORE)
    assert steps[-2:] == ["evaluate", "export"]
    assert code == 0 and out.endswith(f"ok: {TINY}: recipe 'tiny-cpu', steps: {', '.join(steps)}\n")
    assert "ok: corpus sample-vi: built-in sample corpus" in out and "  eeve-3: 4,096 (vi 2,252," in out
    data = tiny_data()
    data["stages"][3]["warmup_steps"] = -2
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    code, out, err = run_vinasmol(monkeypatch, capsys, "recipe", "check", str(bad))
    assert code == 1 and out == "" and "Traceback" not in err
    assert f"invalid recipe {bad}" in err
    assert "stages.3.warmup_steps: Input should be greater than or equal to 0" in err


def test_cli_usage_errors_are_one_message_not_a_traceback(monkeypatch, capsys) -> None:
    code, _, err = run_vinasmol(monkeypatch, capsys, "no-such-command")
    assert code == 2 and "No such command" in err and "Traceback" not in err
    code, _, err = run_vinasmol(monkeypatch, capsys, "recipe", "check")
    assert code == 2 and "Missing argument" in err


def test_console_script_exits_with_the_command_status(tmp_path: Path) -> None:
    """The console entry point skips interpreter teardown; its exit status and output must survive."""
    import subprocess

    ok = subprocess.run([sys.executable, "-c", "from flows.cli import console; console()", "recipe", "check",
                         str(TINY)], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.splitlines()[-1].startswith("ok:")
    bad = subprocess.run([sys.executable, "-c", "from flows.cli import console; console()", "recipe", "check",
                          str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert bad.returncode == 1 and "error:" in bad.stderr


# ----------------------------------------------------------------------------- --set overrides

def test_overrides_by_index_by_name_and_as_yaml_values() -> None:
    recipe = load_recipe(TINY, ["stages.eeve-6.lr=3.5e-4", "stages.0.seq_len=96", "data.dedup=false",
                                "eval.languages=[vi, en]", "stage_defaults.eval_sequences=3"])
    by_name = {s.name: s for s in recipe.stages}
    assert by_name["eeve-6"].lr == 3.5e-4 and recipe.stages[0].seq_len == 96
    assert recipe.data.dedup is False and recipe.eval.languages == ["vi", "en"]
    assert all(s.eval_sequences == 3 for s in recipe.stages)
    assert load_recipe(TINY).stages[2].lr != 3.5e-4  # the file itself is untouched


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("stages.eeve-6.lrr=1e-4", r"stages\.2\.lrr: unknown field"),
        ("data.curation_level=3", r"data\.curation_level: unknown field"),
        ("stages.eeve-9.lr=1e-4", r"--set stages\.eeve-9: no element 'eeve-9'"),
        ("stages.eeve-6.lr=-1", r"stages\.2\.lr: Input should be greater than 0"),
        ("data.dedup.x=1", r"--set data\.dedup\.x: 'dedup' is a value"),
        ("eval.seq_len", r"--set 'eval\.seq_len': expected PATH=VALUE"),
        ("eval.languages=[vi", r"the value is not valid YAML"),
    ],
)
def test_override_errors_name_the_field(line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_recipe(TINY, [line])


def test_a_list_segment_that_is_an_index_and_another_elements_name_is_refused() -> None:
    data = {"stages": [{"name": "warm", "lr": 1.0}, {"name": "0", "lr": 1.0}]}
    for line in ("stages.0.lr=2.0", "stages.0={}"):
        with pytest.raises(ConfigError, match=r"--set stages\.0: '0' is ambiguous: element 0 by index, and "
                                              r"the element named '0' is element 1"):
            apply_overrides(data, [line])
    both = {"stages": [{"name": "1", "lr": 1.0}, {"name": "b", "lr": 1.0}]}
    with pytest.raises(ConfigError, match="'1' is ambiguous"):
        apply_overrides(both, ["stages.1.lr=2.0"])
    # an element named by its own index, an index past the end, a name: one meaning each
    same = apply_overrides({"stages": [{"name": "0", "lr": 1.0}]}, ["stages.0.lr=2.0"])
    assert same["stages"][0]["lr"] == 2.0
    past = apply_overrides({"stages": [{"name": "a"}, {"name": "7", "lr": 1.0}]}, ["stages.7.lr=2.0"])
    assert past["stages"][1]["lr"] == 2.0
    assert apply_overrides(data, ["stages.1.lr=3.0"])["stages"][1]["lr"] == 3.0


def test_a_hub_val_split_equal_to_the_training_split_is_refused_naming_the_field() -> None:
    data = load_recipe(SEED).model_dump(mode="json")
    hub = next(i for i, c in enumerate(data["corpora"]) if c["source"]["kind"] == "hub")
    data["corpora"][hub]["source"]["val_split"] = data["corpora"][hub]["source"]["split"]
    with pytest.raises(ConfigError, match=rf"corpora\.{hub}\.source\.hub\.val_split: val_split 'train' is "
                                          "the training split"):
        parse_recipe(data, "test")
    data["corpora"][hub]["source"]["val_split"] = "validation"
    assert parse_recipe(data, "test").corpora[hub].source.val_split == "validation"


def test_cli_run_with_an_unknown_override_fails_before_any_step(monkeypatch, capsys, tmp_path: Path) -> None:
    log = tmp_path / "timing.jsonl"
    monkeypatch.setenv("VINASMOL_TIMING_LOG", str(log))
    code, _, err = run_vinasmol(monkeypatch, capsys, "run", str(TINY), "--store", str(tmp_path / "store"),
                                "--set", "stages.eeve-3.learning_rate=1e-3")
    assert code == 1 and "stages.0.learning_rate: unknown field" in err and "Traceback" not in err
    assert not log.exists()


def test_a_bracketed_segment_names_an_element_whose_name_has_dots() -> None:
    data = {"stages": [{"name": "eeve-6", "lr": 1.0}, {"name": "eeve-6.1", "lr": 1.0}]}
    out = apply_overrides(data, ["stages[eeve-6.1].lr=2.0", "stages.[eeve-6].lr=3.0"])
    assert [s["lr"] for s in out["stages"]] == [3.0, 2.0]
    assert override_path("stages", "eeve-6.1", "lr") == "stages[eeve-6.1].lr"
    assert override_path("stages", "eeve-6", "lr") == "stages.eeve-6.lr"
    for line in ("stages[eeve-6.1.lr=1", "stages..lr=1", "stages.=1"):
        with pytest.raises(ConfigError, match="expected PATH=VALUE"):
            apply_overrides(data, [line])
