"""Proxy sweeps: choose one stage's mixture and learning rate from many small runs (Sailor's method,
arXiv 2404.03608, with RegMix's regression, arXiv 2407.01492).

A sweep file (`SweepSpec`) names the stage to tune, the proxy (the recipe with `--set` lines, cut down
to a smoke run or not), the search space around the recipe's values, the number of runs and their
token budget, and the objective. `sample_configs` draws the runs' configurations (Dirichlet mixtures
around the stage's mixture, log-uniform learning rates), `proxy_stage` turns one into a `StageSpec`,
`objective_value` scores a run's bits per byte, and `fit_sweep` fits the regression from
configuration to objective, reports its leave-one-out rank correlation and predicts the best
configuration among many candidates drawn from the same space. `patch_lines` are the `--set` lines
that apply a configuration to the recipe.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vinasmol_core.common.errors import ConfigError
from vinasmol_core.plan.recipe import (
    Recipe,
    apply_overrides,
    format_validation_error,
    override_path,
    parse_recipe,
)
from vinasmol_core.train.spec import StageSpec

MIN_FIT_RUNS = 4
CANDIDATES = 4096  # configurations drawn from the search space for the prediction
TOP_K = 8  # the predicted best is the mean of the best TOP_K candidates (RegMix's top-k average)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProxySection(_Strict):
    """The proxy model and data: the recipe, changed by `set` lines (after `smoke` when on)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    smoke: bool = Field(default=False, description="cut the recipe to a smoke run first (`smoke_recipe`)")
    overrides: list[str] = Field(
        default_factory=list, alias="set", description="--set lines for the proxy, e.g. eval.max_bytes=24000"
    )


class MixtureSpace(_Strict):
    vary: list[str] = Field(min_length=2, description="mixture keys (languages, roles or sources) to vary")
    concentration: float = Field(
        default=10.0, gt=0, description="Dirichlet concentration: alpha = concentration x the stage's share"
    )


class LogRange(_Strict):
    low: float = Field(gt=0)
    high: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> LogRange:
        if not self.high > self.low:
            raise ValueError(f"high ({self.high}) must be above low ({self.low})")
        return self


class SearchSpace(_Strict):
    mixture: MixtureSpace | None = None
    lr: LogRange | None = None
    global_batch: list[int] | None = Field(default=None, min_length=1, description="batch sizes to try")


class ProxyConfig(_Strict):
    """One proxy run's configuration: the stage's mixture (every key, summing as the stage's does),
    learning rate and global batch."""

    mixture: dict[str, float]
    lr: float = Field(gt=0)
    global_batch: int = Field(gt=0)


class ObjectiveTerm(_Strict):
    """`weight` x bpb, plus `penalty` x how far bpb goes above (1 + keep_within) x its base value."""

    weight: float = 0.0
    keep_within: float | None = Field(default=None, ge=0, description="allowed rise over the base bpb")
    penalty: float = Field(default=0.0, ge=0)


def _default_objective() -> dict[str, ObjectiveTerm]:
    return {"vi": ObjectiveTerm(weight=1.0), "en": ObjectiveTerm(keep_within=0.02, penalty=5.0)}


class SweepSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    stage: str = Field(min_length=1, description="the recipe stage to tune")
    proxy: ProxySection = Field(default_factory=ProxySection)
    search: SearchSpace = Field(default_factory=SearchSpace)
    runs: int = Field(default=12, ge=0, description="configurations drawn from the search space")
    configs: list[dict[str, Any]] = Field(
        default_factory=list, description="runs besides the drawn ones: mixture / lr / global_batch"
    )
    tokens_per_run: int = Field(gt=0, description="training tokens of each proxy run")
    seed: int = Field(default=0, description="seed of the draws (the runs train with the stage's seed)")
    parallel: int = Field(default=1, gt=0, description="proxy runs in flight at once")
    check_seeds: list[int] = Field(
        default_factory=lambda: [1], description="training seeds of the check runs (best and recipe's values)"
    )
    objective: dict[str, ObjectiveTerm] = Field(default_factory=_default_objective)

    def objective_text(self) -> str:
        parts = []
        for lang, term in self.objective.items():
            if term.weight:
                parts.append(f"{term.weight:g} x bpb[{lang}]")
            if term.penalty and term.keep_within is not None:
                limit = f"{1 + term.keep_within:g} x base[{lang}]"
                parts.append(f"{term.penalty:g} x max(0, bpb[{lang}] - {limit})")
        return " + ".join(parts) or "0"


def load_sweep(path: str | Path) -> SweepSpec:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read sweep file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep file {path} is not valid YAML: {exc}") from None
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"sweep file {path}")) from None


def proxy_recipe(recipe: Recipe, sweep: SweepSpec) -> Recipe:
    """The recipe the proxy runs use: smoke-cut when asked, then the sweep's `set` lines."""
    from vinasmol_core.plan.smoke import smoke_recipe

    proxy = smoke_recipe(recipe) if sweep.proxy.smoke else recipe
    if sweep.proxy.overrides:
        data = proxy.model_dump(mode="json", by_alias=True)
        proxy = parse_recipe(apply_overrides(data, sweep.proxy.overrides), "sweep proxy (with proxy.set)")
    return proxy


def tuned_stage(recipe: Recipe, sweep: SweepSpec) -> tuple[int, StageSpec]:
    names = [s.name for s in recipe.stages]
    if sweep.stage not in names:
        raise ConfigError(f"sweep stage: {sweep.stage!r} is no stage of recipe {recipe.name!r} "
                          f"(stages: {', '.join(names)})")
    index = names.index(sweep.stage)
    return index, recipe.stages[index]


def check_sweep(recipe: Recipe, sweep: SweepSpec) -> StageSpec:
    """The user's recipe's tuned stage, once every field of the sweep that depends on the recipe is
    checked against it and against the proxy recipe (`proxy_recipe`): the batches searched must suit
    the proxy runs and the recipe the choice patches."""
    stage = check_stage(recipe, sweep, proxy=False)
    check_stage(proxy_recipe(recipe, sweep), sweep)
    return stage


def check_stage(recipe: Recipe, sweep: SweepSpec, *, proxy: bool = True) -> StageSpec:
    """The tuned stage of `recipe`, once every field of the sweep that depends on it is checked: as
    the proxy recipe (the runs' batches) or as the recipe the choice patches (`proxy=False`)."""
    _, stage = tuned_stage(recipe, sweep)
    if sweep.search.mixture is not None:
        unknown = [k for k in sweep.search.mixture.vary if k not in stage.mixture]
        if unknown:
            raise ConfigError(f"search.mixture.vary: {', '.join(unknown)} not in stage {stage.name}'s "
                              f"mixture ({', '.join(stage.mixture)})")
    for lang in sweep.objective:
        if lang not in recipe.eval.languages:
            raise ConfigError(f"objective.{lang}: not an evaluated language (eval.languages: "
                              f"{', '.join(recipe.eval.languages)})")
    for i, raw in enumerate(sweep.configs):
        try:
            explicit_config(stage, raw)
        except (ValidationError, ConfigError) as exc:
            message = format_validation_error(exc, "") if isinstance(exc, ValidationError) else str(exc)
            raise ConfigError(f"configs.{i}: {message.strip()}") from None
    if sweep.runs + len(sweep.configs) < MIN_FIT_RUNS:
        raise ConfigError(f"runs: {sweep.runs} drawn + {len(sweep.configs)} given is fewer than the "
                          f"{MIN_FIT_RUNS} runs a fit needs")
    space = sweep.search
    if sweep.runs and space.mixture is None and space.lr is None and not space.global_batch:
        raise ConfigError("search: runs are drawn but the search space is empty (mixture, lr, global_batch)")
    _check_batches(stage, sweep, proxy)
    if not any(varied_dimensions(stage, sweep)):
        raise ConfigError("search and configs: no run differs from the stage's values (nothing to fit)")
    return stage


def _check_batches(stage: StageSpec, sweep: SweepSpec, proxy: bool) -> None:
    """Every global batch the runs may take (searched or given) makes a valid proxy run of the proxy
    recipe's `stage`; when the batch is searched (and so may be the choice), a valid stage of the
    user's recipe once patched."""
    batches = [("search.global_batch", b) for b in sweep.search.global_batch or []]
    batches += [(f"configs.{i}.global_batch", raw["global_batch"]) for i, raw in enumerate(sweep.configs)
                if "global_batch" in raw]
    if not proxy and not sweep.search.global_batch:
        return
    whose = "the proxy recipe's" if proxy else "the recipe's"
    for where, batch in batches:
        if proxy:
            config = recipe_config(stage).model_copy(update={"global_batch": int(batch)})
            spec = proxy_stage(stage, config, sweep, stage.name, check=False)
        else:
            spec = stage.model_copy(update={"global_batch": int(batch)})
        per_device, rest = divmod(spec.global_batch, spec.world_size)
        if rest or per_device % spec.micro_batch:
            raise ConfigError(
                f"{where}: {batch} does not suit {whose} stage {stage.name}: its micro_batch "
                f"{spec.micro_batch} x {spec.world_size} device(s) does not divide it; search multiples of "
                f"{spec.micro_batch * spec.world_size} or change the stage's micro_batch"
            )


def recipe_config(stage: StageSpec) -> ProxyConfig:
    return ProxyConfig(mixture=dict(stage.mixture), lr=stage.lr, global_batch=stage.global_batch)


def explicit_config(stage: StageSpec, raw: dict[str, Any]) -> ProxyConfig:
    """A `configs` entry: the stage's values with the given ones; a partial mixture is completed
    with the stage's other keys."""
    mixture = dict(stage.mixture)
    given = raw.get("mixture") or {}
    if not isinstance(given, dict):
        raise ConfigError("mixture: expected a mapping of key to weight")
    unknown = [k for k in given if k not in stage.mixture]
    if unknown:
        raise ConfigError(f"mixture: {', '.join(unknown)} not in stage {stage.name}'s mixture")
    mixture.update({k: float(v) for k, v in given.items()})
    data = {"lr": stage.lr, "global_batch": stage.global_batch, **raw, "mixture": mixture}
    return ProxyConfig.model_validate(data)


def _draw(stage: StageSpec, space: SearchSpace, rng: np.random.Generator, count: int) -> list[ProxyConfig]:
    out = []
    for _ in range(count):
        mixture = dict(stage.mixture)
        if space.mixture is not None:
            keys = space.mixture.vary
            mass = sum(stage.mixture[k] for k in keys)
            alpha = [max(space.mixture.concentration * stage.mixture[k] / mass, 1e-3) for k in keys]
            shares = rng.dirichlet(alpha)
            mixture.update({k: round(float(s) * mass, 4) for k, s in zip(keys, shares, strict=True)})
        lr = stage.lr
        if space.lr is not None:
            lr = float(math.exp(rng.uniform(math.log(space.lr.low), math.log(space.lr.high))))
            lr = float(f"{lr:.3g}")
        batch = int(rng.choice(space.global_batch)) if space.global_batch else stage.global_batch
        out.append(ProxyConfig(mixture=mixture, lr=lr, global_batch=batch))
    return out


def sample_configs(stage: StageSpec, sweep: SweepSpec) -> list[ProxyConfig]:
    """The sweep's configurations: the given ones, then `runs` drawn ones (the same for the same seed)."""
    given = [explicit_config(stage, raw) for raw in sweep.configs]
    return given + _draw(stage, sweep.search, np.random.default_rng(sweep.seed), sweep.runs)


def proxy_stage(stage: StageSpec, config: ProxyConfig, sweep: SweepSpec, name: str,
                seed: int | None = None, *, check: bool = True) -> StageSpec:
    """The tuned stage as one proxy run: the configuration, the sweep's token budget, its own name
    (`check=False`: without `StageSpec.check` and the schedule fitted to it)."""
    batch = config.global_batch
    micro = min(stage.micro_batch, max(batch // stage.world_size, 1))
    spec = stage.model_copy(update={
        "name": name, "mixture": config.mixture, "lr": config.lr, "min_lr": min(stage.min_lr, config.lr),
        "global_batch": batch, "micro_batch": micro, "max_tokens": sweep.tokens_per_run,
        "seed": stage.seed if seed is None else seed,
    })
    spec = StageSpec.model_validate(spec.model_dump())
    if not check:
        return spec
    spec.check()
    steps = spec.total_steps
    return spec.model_copy(update={
        "warmup_steps": min(spec.warmup_steps, max(steps // 10, 1)),
        # one train-state half way (a killed run resumes from it), one evaluation at the end; only
        # the newest train-state stays (a sweep of many runs of a real model would fill the disk)
        "eval_interval": steps, "checkpoint_interval": max(steps // 2, 1), "keep_checkpoints": 1,
        "eval_at_start": False,
    })


def objective_value(sweep: SweepSpec, bpb: dict[str, float], base: dict[str, float]) -> float | None:
    """The sweep's objective for one run's bits per byte (lower is better; None: a language missing)."""
    total = 0.0
    for lang, term in sweep.objective.items():
        value = bpb.get(lang)
        if value is None or not math.isfinite(value):
            return None
        total += term.weight * value
        if term.penalty and term.keep_within is not None and lang in base:
            total += term.penalty * max(0.0, value - (1 + term.keep_within) * base[lang])
    return total


def varied_dimensions(stage: StageSpec, sweep: SweepSpec) -> tuple[list[str], bool, bool]:
    """What the sweep varies, by its definition: the mixture keys (sorted), whether the lr, whether the
    global batch. A key, the lr or the batch is varied when the search space draws it or a `configs`
    entry gives it a value other than the stage's. Anything else only moves by rounding (a fixed key's
    share when the varied ones' rounded weights do not sum exactly), and must not enter the fit."""
    space = sweep.search
    keys = set(space.mixture.vary) if space.mixture is not None else set()
    lr = space.lr is not None
    batch = bool(space.global_batch) and len(set(space.global_batch) | {stage.global_batch}) > 1
    for raw in sweep.configs:
        given = raw.get("mixture") or {}
        keys |= {k for k, v in given.items() if k in stage.mixture and float(v) != stage.mixture[k]}
        lr = lr or ("lr" in raw and float(raw["lr"]) != stage.lr)
        batch = batch or ("global_batch" in raw and int(raw["global_batch"]) != stage.global_batch)
    return sorted(keys), lr, batch


def features(configs: list[ProxyConfig], keys: list[str]) -> np.ndarray:
    """One row per configuration: the share of each of `keys`, log10 lr, log2 global batch."""
    rows = []
    for c in configs:
        total = sum(c.mixture.values()) or 1.0
        rows.append([c.mixture.get(k, 0.0) / total for k in keys]
                    + [math.log10(c.lr), math.log2(c.global_batch)])
    return np.asarray(rows, dtype=float).reshape(len(configs), len(keys) + 2)


class SweepFit(BaseModel):
    """The regression's verdict: which runs it used, how well it ranks unseen runs, what it predicts."""

    used: int
    spearman_loo: float | None = Field(description="Spearman rho of leave-one-out predictions and objectives")
    best: ProxyConfig
    predicted_objective: float
    best_measured: int = Field(description="index of the run with the lowest measured objective")


def _model() -> Any:
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    # Quadratic terms so that an interior optimum (of the lr, say) can be found; ridge for the few runs.
    return make_pipeline(StandardScaler(), PolynomialFeatures(degree=2, include_bias=False), StandardScaler(),
                         RidgeCV(alphas=np.logspace(-3, 3, 13)))


def fit_sweep(sweep: SweepSpec, stage: StageSpec, configs: list[ProxyConfig],
              objectives: list[float | None]) -> SweepFit:
    """Fit objective ~ configuration on the finished runs (None: failed, left out); predict the best
    configuration among `CANDIDATES` drawn from the search space (and the runs' own)."""
    from scipy.stats import spearmanr
    from sklearn.model_selection import LeaveOneOut, cross_val_predict

    done = [i for i, v in enumerate(objectives) if v is not None and math.isfinite(v)]
    if len(done) < MIN_FIT_RUNS:
        raise ConfigError(f"sweep {sweep.name}: {len(done)} proxy run(s) done; a fit needs {MIN_FIT_RUNS}")
    keys, lr, batch = varied_dimensions(stage, sweep)
    if not (keys or lr or batch):
        raise ConfigError(f"sweep {sweep.name}: no run differs from the stage's values (nothing to fit)")
    columns = [*range(len(keys)), *([len(keys)] if lr else []), *([len(keys) + 1] if batch else [])]

    def varied(chosen: list[ProxyConfig]) -> np.ndarray:
        return features(chosen, keys)[:, columns]

    x = varied([configs[i] for i in done])
    y = np.asarray([objectives[i] for i in done], dtype=float)
    rho: float | None = None
    if np.ptp(y) > 0:
        predicted = cross_val_predict(_model(), x, y, cv=LeaveOneOut())
        value = spearmanr(predicted, y).statistic
        rho = float(value) if math.isfinite(value) else None
    model = _model().fit(x, y)
    rng = np.random.default_rng(sweep.seed + 1)
    candidates = [configs[i] for i in done]
    space = sweep.search
    if space.mixture is not None or space.lr is not None or space.global_batch:
        candidates += _draw(stage, space, rng, CANDIDATES)
    scores = model.predict(varied(candidates))
    top = [candidates[i] for i in np.argsort(scores, kind="stable")[:TOP_K]]
    best = _average(top)
    return SweepFit(
        used=len(done), spearman_loo=rho, best=best,
        predicted_objective=float(model.predict(varied([best]))[0]),
        best_measured=done[int(np.argmin(y))],
    )


def _average(configs: list[ProxyConfig]) -> ProxyConfig:
    """The mean mixture, the geometric mean lr and the most common batch of `configs`."""
    keys = list(configs[0].mixture)
    mixture = {k: round(sum(c.mixture[k] for c in configs) / len(configs), 4) for k in keys}
    lr = math.exp(sum(math.log(c.lr) for c in configs) / len(configs))
    batches = [c.global_batch for c in configs]
    batch = max(set(batches), key=batches.count)
    return ProxyConfig(mixture=mixture, lr=float(f"{lr:.3g}"), global_batch=batch)


def patch_lines(stage: StageSpec, config: ProxyConfig, *, batch_searched: bool = False) -> list[str]:
    """`--set` values that give the recipe's stage this configuration (only what differs). The batch
    enters only when the sweep searched it: otherwise it is the proxy's own, no choice."""
    lines = []
    if config.mixture != stage.mixture:
        body = ", ".join(f"{k}: {v:g}" for k, v in config.mixture.items())
        lines.append(f"{override_path('stages', stage.name, 'mixture')}={{{body}}}")
    if config.lr != stage.lr:
        lines.append(f"{override_path('stages', stage.name, 'lr')}={config.lr:g}")
    if batch_searched and config.global_batch != stage.global_batch:
        lines.append(f"{override_path('stages', stage.name, 'global_batch')}={config.global_batch}")
    return lines


def patched_recipe_text(recipe_path: str | Path, lines: list[str]) -> str:
    """The recipe file with `lines` applied, as YAML (checked by loading it back)."""
    data = yaml.safe_load(Path(recipe_path).read_text(encoding="utf-8"))
    patched = apply_overrides(data, lines)
    parse_recipe(patched, f"{recipe_path} (patched)")
    return yaml.safe_dump(patched, sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------- report
def _cell(value: Any, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, int | float) and math.isfinite(value) else "-"


def runs_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per proxy or check run: its configuration, bits per byte, objective, status."""
    if not rows:
        return "_no runs_"
    keys = list(rows[0]["mixture"])
    langs = sorted({lang for r in rows for lang in r["bpb"]})
    lines = ["| run | kind | seed | " + " | ".join(f"w {k}" for k in keys) + " | lr | batch | steps | "
             + " | ".join(f"{lang} BPB" for lang in langs) + " | objective | status |",
             "| --- | --- | ---: |" + " ---: |" * (len(keys) + 3 + len(langs) + 1) + " --- |"]
    for r in rows:
        status = r["status"] + (f": {r['error']}" if r.get("error") else "")
        lines.append(
            f"| {r['run']} | {r['kind']} | {r['seed']} | "
            + " | ".join(f"{r['mixture'][k]:.3f}" for k in keys)
            + f" | {r['lr']:.3g} | {r['global_batch']} | {r['steps']} | "
            + " | ".join(_cell(r["bpb"].get(lang)) for lang in langs)
            + f" | {_cell(r['objective'])} | {status.replace('|', '/')} |"
        )
    return "\n".join(lines)


def scatter_svgs(rows: list[dict[str, Any]], key: str) -> list[str]:
    """Two SVG scatter charts of the proxy runs' objective: against the weight of `key`, against the lr."""
    from vinasmol_core.common.chart import Series, line_chart_svg

    done = [r for r in rows if r["kind"] == "proxy" and r["objective"] is not None]
    if not done:
        return []
    by_weight = [(r["mixture"][key] / (sum(r["mixture"].values()) or 1.0), r["objective"]) for r in done]
    by_lr = [(math.log10(r["lr"]), r["objective"]) for r in done]
    return [
        line_chart_svg([Series("proxy runs", by_weight, line=False)], x_label=f"{key} share of the mixture",
                       title=f"objective against the {key} share", y_label="objective"),
        line_chart_svg([Series("proxy runs", by_lr, line=False)], x_label="log10 lr",
                       title="objective against the learning rate", y_label="objective"),
    ]


def sweep_markdown(result: dict[str, Any], images: list[str] | None = None) -> str:
    """The sweep's report: objective, runs, fit, choice (with its `--set` lines), checks, charts."""
    fit = result["fit"]
    best = fit["best"]
    rho = fit["spearman_loo"]
    start = result["start"]
    lines = [
        f"# Sweep {result['sweep']}: stage {result['stage']} of {result['recipe']}",
        "",
        f"Objective (lower is better): {result['objective']}; base = the base model's bits per byte "
        f"({', '.join(f'{k} {v:.4f}' for k, v in result['base_bpb'].items())}). The runs start from "
        f"`{start['label']}` ({', '.join(f'{k} {v:.4f}' for k, v in start['bpb'].items())}).",
        "",
        runs_table(result["rows"]),
        "",
        f"Fit: {fit['used']} finished proxy runs; leave-one-out Spearman rank correlation "
        f"{'-' if rho is None else f'{rho:.3f}'}; lowest measured objective: run "
        f"{result['rows'][fit['best_measured']]['run']}.",
        "",
        "Predicted best: mixture " + ", ".join(f"{k} {v:.3f}" for k, v in best["mixture"].items())
        + f", lr {best['lr']:.3g}, global batch {best['global_batch']} "
        f"(predicted objective {fit['predicted_objective']:.4f}).",
        "",
    ]
    checks = [r for r in result["rows"] if r["kind"] != "proxy"]
    for kind in ("best", "recipe"):
        values = [r["objective"] for r in checks if r["kind"] == kind and r["objective"] is not None]
        if values:
            lines.append(f"- check runs of the {kind} values: objective "
                         + ", ".join(f"{v:.4f}" for v in values))
    set_lines = result["set_lines"]
    intro = "Apply it to the recipe:" if set_lines else "The recipe's values are the predicted best."
    lines += ["", intro, ""]
    lines += [f"    --set '{line}'" for line in set_lines]
    if images:
        lines += ["", *images]
    return "\n".join(lines) + "\n"
