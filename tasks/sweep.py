"""The sweep's fitting step, one cached Prefect task: `fit_sweep` ("fit-sweep") fits the regression
from the proxy runs' configurations to their objective and predicts the best configuration
(`vinasmol_core.plan.sweep.fit_sweep`). The proxy runs themselves are `train-stage` and `evaluate` steps."""

from __future__ import annotations

from tasks.common import step
from vinasmol_core.common.steps import Step
from vinasmol_core.plan import sweep as lib
from vinasmol_core.train.spec import StageSpec


@step(Step.FIT_SWEEP)
def fit_sweep(
    sweep: lib.SweepSpec,
    stage: StageSpec,
    configs: list[lib.ProxyConfig],
    objectives: list[float | None],
    store_url: str,
) -> lib.SweepFit:
    """The fit on the finished runs (a NaN objective is a failed run, left out)."""
    return lib.fit_sweep(sweep, stage, configs, objectives)
