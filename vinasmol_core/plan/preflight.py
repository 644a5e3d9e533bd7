"""What a recipe needs before any step runs: every local file, every hub dataset and model reachable
(on the hub, in a hub mirror or in the HF cache), every hub dataset's columns and first row what the
corpus reads (its text field, or its `document` columns), every parquet shard of a mirror readable,
and the tokens it plans per stage and per source.

`check_inputs` reports each input; `require_inputs` raises one VinaSmolError listing every input a
run cannot read, with how to fix it (the pipeline calls it before its first step). `plan_tokens`
spreads each stage's `max_tokens` over the mixture's keys and, inside a key, over its sources in
proportion to their budgets, as the sampler does with their prepared tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.hub import (
    HubCheck,
    check_dataset_mirror,
    check_dataset_online,
    check_model,
    dataset_help,
    describe_dataset,
    mirror_dir,
    model_help,
)
from vinasmol_core.plan.recipe import CorpusSpec, FilesSource, HFBase, HubBase, HubSource, Recipe

FAILED = ("missing", "unknown")


def _file_check(label: str, path: str, folder: bool = False) -> HubCheck:
    p = Path(path)
    ok = p.is_dir() if folder else p.is_file()
    kind = "folder" if folder else "file"
    return HubCheck(label, "ok" if ok else "missing", f"{kind} {path}" + ("" if ok else " does not exist"))


def _corpus_checks(corpus: CorpusSpec, mirror: Path | None, network: bool) -> list[HubCheck]:
    label = f"corpus {corpus.name}"
    source = corpus.source
    if isinstance(source, FilesSource):
        return [_file_check(label, p) for p in [*source.train, *source.val]]
    if not isinstance(source, HubSource):
        return [HubCheck(label, "ok", f"built-in {source.kind} corpus")]
    splits = [source.split]
    if source.val_split and source.val_split != source.split:
        splits.append(source.val_split)
    checks = []
    for split in splits:
        if mirror is not None:
            check = check_dataset_mirror(label, mirror_dir(mirror, source.dataset), source.config, split)
        elif network:
            check = check_dataset_online(label, source.dataset, source.config, split, source.revision)
        else:
            check = HubCheck(label, "offline", "not checked: offline")
        what = describe_dataset(source.dataset, source.config, split, source.revision)
        if check.status == "ok" and split == source.split:
            content = _content_check(label, corpus, source, mirror, split)
            check = HubCheck(label, content.status, content.detail if content.status != "ok"
                             else f"{check.detail}; {content.detail}")
        checks.append(HubCheck(label, check.status, f"hub dataset {what}: {check.detail}"))
    return checks


def _source_spec(corpus: CorpusSpec, source: HubSource, mirror: Path | None, split: str) -> Any:
    from vinasmol_core.data.spec import SourceSpec

    return SourceSpec(
        name=corpus.name, lang=corpus.lang, role=corpus.role, text_field=corpus.text_field,
        document=corpus.document, id_field=source.id_field, hf_dataset=source.dataset,
        hf_config=source.config, hf_split=split, hf_revision=source.revision,
        hf_data_files=tuple(source.data_files),
        hf_path=str(mirror_dir(mirror, source.dataset)) if mirror is not None else None,
    )


def _fields_fix(corpus: CorpusSpec) -> str:
    return ("set the corpus's document columns to the dataset's" if corpus.document is not None
            else "set the corpus's text_field to the column holding the text")


def _content_check(label: str, corpus: CorpusSpec, source: HubSource, mirror: Path | None,
                   split: str) -> HubCheck:
    """The dataset's columns (its features) and its first row hold what the corpus reads, and, in a
    mirror, every parquet shard of the split has a readable footer (a truncated download has none)."""
    from vinasmol_core.data.readers import _text_of, open_hf_dataset

    spec = _source_spec(corpus, source, mirror, split)
    try:
        ds = open_hf_dataset(spec, split)
    except VinaSmolError as exc:
        return HubCheck(label, "missing", str(exc).removeprefix(f"source {corpus.name!r}: "))
    if mirror is not None:
        broken = _broken_parquet(ds)
        if broken:
            return HubCheck(label, "missing", f"shard {broken[0]} is not a readable parquet file "
                                              f"({broken[1]}); download it again")
    features = getattr(ds, "features", None)
    needed = spec.columns()
    if features:
        missing = [c for c in needed if c not in features]
        if missing:
            return HubCheck(label, "missing", f"no column {', '.join(map(repr, missing))} (columns: "
                                              f"{', '.join(list(features)[:12])}); {_fields_fix(corpus)}")
    try:
        row = next(iter(ds), None)
    except Exception as exc:  # noqa: BLE001 - a corrupt shard, a decoding error, the network
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return HubCheck(label, "missing", f"cannot read its first row: {first}")
    if row is None:
        return HubCheck(label, "missing", f"split {split!r} has no rows")
    missing = [c for c in needed if c not in row]
    if missing:
        fields = ", ".join(sorted(map(str, row))[:12])
        return HubCheck(label, "missing", f"its first row has no field {', '.join(map(repr, missing))} "
                                          f"(fields: {fields}); {_fields_fix(corpus)}")
    try:
        _text_of(row, spec, "its first row")
    except VinaSmolError as exc:
        return HubCheck(label, "missing", str(exc).removeprefix(f"source {corpus.name!r}: "))
    return HubCheck(label, "ok", f"columns {', '.join(needed)} read")


def _broken_parquet(ds: Any) -> tuple[str, str] | None:
    """The first local parquet data file of a streamed dataset whose footer cannot be read, and why."""
    import pyarrow.parquet as pq

    files = getattr(getattr(ds, "_ex_iterable", None), "kwargs", {}).get("files") or []
    for name in (str(f) for group in files for f in (group if isinstance(group, list) else [group])):
        if name.endswith(".parquet") and Path(name).is_file():
            try:
                pq.read_metadata(name)
            except Exception as exc:  # noqa: BLE001 - pyarrow's errors for a damaged file vary
                return name, str(exc).splitlines()[0]
    return None


def check_inputs(recipe: Recipe, mirror: Path | None, network: bool = True) -> list[HubCheck]:
    """One check per input of the recipe: local files and folders, hub datasets and the hub model."""
    checks: list[HubCheck] = []
    base = recipe.base_model.source
    if isinstance(base, HFBase) and not base.path.startswith("store:"):
        checks.append(_file_check("base model", base.path, folder=True))
    elif isinstance(base, HubBase):
        check = check_model("base model", base.repo, base.revision, mirror, network)
        detail = f"hub model {base.repo} @ {base.revision}: {check.detail}"
        checks.append(HubCheck(check.label, check.status, detail))
    else:
        checks.append(HubCheck("base model", "ok", f"built-in {base.kind} model"))
    for corpus in recipe.corpora:
        checks.extend(_corpus_checks(corpus, mirror, network))
    if recipe.embedding_init.translations:
        checks.append(_file_check("embedding_init.translations", recipe.embedding_init.translations))
    return checks


def _fix(recipe: Recipe, check: HubCheck) -> str:
    """How to make the input of a failed check readable."""
    if check.label == "base model" and isinstance(recipe.base_model.source, HubBase):
        src = recipe.base_model.source
        return model_help(src.repo, src.revision)
    name = check.label.removeprefix("corpus ")
    for corpus in recipe.corpora:
        if corpus.name == name and isinstance(corpus.source, HubSource):
            return dataset_help(corpus.source.dataset, corpus.source.config, corpus.source.revision)
    return "fix the path in the recipe"


def require_inputs(recipe: Recipe, mirror: Path | None, network: bool = True) -> list[HubCheck]:
    """Every input readable, or one VinaSmolError naming each that is not (offline counts: a run
    needs the hub) and how to pre-download it or point at a local copy."""
    checks = check_inputs(recipe, mirror, network)
    bad = [c for c in checks if c.status != "ok"]
    if bad:
        lines = [c.line.replace("not checked: offline", "unreachable: offline")
                 + (f"; {_fix(recipe, c)}" if c.status != "unknown" else "") for c in bad]
        raise VinaSmolError("the recipe's inputs are not all readable (nothing was run):\n  "
                            + "\n  ".join(lines))
    return checks


# ----------------------------------------------------------------------------- token plan
@dataclass(frozen=True)
class StagePlan:
    """Planned training tokens of one stage: per mixture key, and per source where budgets say."""

    stage: str
    tokens: int
    keys: dict[str, int]
    sources: dict[str, int | None]


def _budget_tokens(corpus: CorpusSpec) -> int | None:
    source = corpus.source
    return source.budget.planned_tokens(corpus.lang) if isinstance(source, HubSource) else None


def plan_tokens(recipe: Recipe) -> list[StagePlan]:
    """Each stage's max_tokens spread over its mixture keys (normalised weights) and over each key's
    sources in proportion to their token budgets (None where a member has no token budget)."""
    from vinasmol_core.data.sampler import resolve_weight_keys

    plans = []
    for stage in recipe.stages:
        main = recipe.stage_dataset(stage) == "main"
        members = recipe.corpora_with_role("main") if main else recipe.corpora
        metas = [{"name": c.name, "lang": c.lang, "role": c.role} for c in members]
        weights = {k: w for k, w in stage.mixture.items() if w > 0}
        groups = resolve_weight_keys(weights, metas)
        total_w = sum(weights.values())
        by_name = {c.name: c for c in members}
        keys: dict[str, int] = {}
        sources: dict[str, int | None] = {}
        for key, w in weights.items():
            key_tokens = int(stage.max_tokens * w / total_w) if stage.max_tokens else 0
            keys[key] = key_tokens
            budgets = {n: _budget_tokens(by_name[n]) for n in groups[key]}
            known = [b for b in budgets.values() if b is not None]
            for n, b in budgets.items():
                if len(budgets) == 1:
                    sources[n] = key_tokens
                elif b is None or len(known) != len(budgets):
                    sources[n] = None
                else:
                    sources[n] = int(key_tokens * b / sum(known))
        plans.append(StagePlan(stage.name, int(stage.max_tokens or 0), keys, sources))
    return plans


def kept_tokens(store_url: str) -> dict[str, tuple[int | None, int]]:
    """Per source of the datasets the data step last published to the store (refs `datasets/main` and
    `datasets/annealing`): (planned tokens, training tokens really kept). Empty without a dataset."""
    from vinasmol_core.store import ArtifactStore

    store = ArtifactStore(store_url)
    out: dict[str, tuple[int | None, int]] = {}
    for ref in ("datasets/main", "datasets/annealing"):
        if not store.exists(ref):
            continue
        for name, stats in (getattr(store.get_manifest(ref), "stats", None) or {}).items():
            out[name] = (stats.get("planned_tokens"), int(stats.get("train_tokens", 0)))
    return out


def format_plan(recipe: Recipe, plans: list[StagePlan],
                kept: dict[str, tuple[int | None, int]] | None = None) -> list[str]:
    """The token plan as text lines: one per stage, then one per source (total against its budget and,
    given `kept` (see `kept_tokens`), against the training tokens its prepared dataset really holds)."""
    def m(n: int | None) -> str:
        if n is None:
            return "?"
        return f"{n / 1e6:,.1f}M" if n >= 1_000_000 else f"{n:,}"

    lines = ["planned training tokens per stage:"]
    for p in plans:
        parts = ", ".join(f"{k} {m(v)}" for k, v in p.keys.items())
        lines.append(f"  {p.stage}: {m(p.tokens)} ({parts})")
    lines.append("planned training tokens per source (all stages) / budget"
                 + (" / kept by the data step:" if kept else ":"))
    for corpus in recipe.corpora:
        seen = [p.sources[corpus.name] for p in plans if corpus.name in p.sources]
        total = None if any(v is None for v in seen) else sum(v or 0 for v in seen)
        budget = _budget_tokens(corpus)
        source = corpus.source
        if isinstance(source, HubSource) and budget is None:
            budget_text = f"{source.budget.documents:,} documents"
        else:
            budget_text = m(budget) if budget is not None else "all of it"
        real = ""
        if kept:
            real = f" / {m(kept[corpus.name][1])}" if corpus.name in kept else " / not prepared"
        lines.append(f"  {corpus.name} ({corpus.lang}, {corpus.role}): {m(total) if seen else 'unused'} "
                     f"/ {budget_text}{real}")
    return lines
