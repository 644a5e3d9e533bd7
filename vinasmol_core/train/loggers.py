"""A stage's metric loggers besides metrics.jsonl: Fabric's CSVLogger and TensorBoardLogger, and
Weights & Biases when the recipe asks for it (rank 0 only).

Each logged step is one row: a step's training metrics and an evaluation at the same step are
written together (`val_loss/<lang>`, `val_bpb/<lang>`). A resumed stage replays the history it
restored, so the CSV and TensorBoard logs of the final checkpoint hold every logged step once.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

from vinasmol_core.common.errors import ConfigError
from vinasmol_core.train.spec import StageJob, StageLogging

LOG_DIR_ENV = "VINASMOL_LOG_DIR"
STEP_KEYS = ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time_s")


def check_logging(logging: StageLogging) -> None:
    """Raise ConfigError when an enabled logger cannot work here (missing package or W&B key)."""
    if logging.tensorboard and not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        raise ConfigError(
            "logging.tensorboard is on but neither tensorboardX nor tensorboard is installed: "
            "`pip install tensorboardX`, or set logging.tensorboard: false"
        )
    if not logging.wandb:
        return
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "logging.wandb is on but the wandb package is not installed in the training environment: "
            "`pip install 'vinasmol[wandb]'` (or `pip install wandb`), or set logging.wandb: false"
        )
    netrc = Path.home() / ".netrc"
    logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")
    if logging.wandb_mode == "online" and not os.environ.get("WANDB_API_KEY") and not logged_in:
        raise ConfigError(
            "logging.wandb is on but no W&B key is set: export WANDB_API_KEY in the environment of the "
            "training process (in deployment mode: the CUDA pool's worker), run `wandb login`, or set "
            "logging.wandb_mode: offline"
        )


def log_root(job: StageJob, work: Path, resume_key: str) -> Path:
    """The live log folder: <dir>/<stage>/<resume key[:16]>, or <work>/logs without a dir."""
    base = job.logging.dir or os.environ.get(LOG_DIR_ENV)
    if not base:
        return work / "logs"
    return Path(base).expanduser() / job.spec.name / resume_key[:16]


def step_row(event: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of a `step` or `eval` event as one flat row."""
    if event.get("event") == "eval":
        row: dict[str, float] = {}
        for kind in ("val_loss", "val_bpb"):
            for lang, value in (event.get(kind) or {}).items():
                if isinstance(value, int | float):
                    row[f"{kind}/{lang}"] = float(value)
        return row
    return {k: float(event[k]) for k in STEP_KEYS if isinstance(event.get(k), int | float)}


class StageLoggers:
    """The enabled loggers of one stage; `on_event` takes each metrics event as it is emitted."""

    def __init__(self, job: StageJob, root: Path) -> None:
        check_logging(job.logging)
        self.root = root
        self.loggers: list[Any] = []
        self.wandb_run: Any = None
        self.pending_step: int | None = None
        self.pending: dict[str, float] = {}
        # a resumed attempt replays the whole history: older logs of this folder would repeat it
        for sub in ("csv", "tensorboard"):
            shutil.rmtree(root / sub, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        if job.logging.csv:
            from lightning.fabric.loggers import CSVLogger

            self.loggers.append(CSVLogger(root, name="", version="csv", flush_logs_every_n_steps=1))
        if job.logging.tensorboard:
            from lightning.fabric.loggers import TensorBoardLogger

            self.loggers.append(
                TensorBoardLogger(root, name="", version="tensorboard", default_hp_metric=False)
            )
        if job.logging.wandb:
            import wandb

            self.wandb_run = wandb.init(
                project=job.logging.wandb_project,
                entity=job.logging.wandb_entity,
                mode=job.logging.wandb_mode,
                name=job.spec.name,
                config={"spec": job.spec.math_fields(), "init": job.init_checkpoint, "dataset": job.dataset},
                dir=str(root),
            )

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "history":
            for past in event.get("events", []):
                self.on_event(past)
            return
        if kind not in ("step", "eval") or not isinstance(event.get("step"), int):
            return
        if self.pending_step is not None and event["step"] != self.pending_step:
            self.flush()
        self.pending_step = event["step"]
        self.pending.update(step_row(event))

    def flush(self) -> None:
        """Write the pending step's row to every logger."""
        if self.pending_step is None:
            return
        step, row = self.pending_step, self.pending
        self.pending_step, self.pending = None, {}
        if not row:
            return
        for logger in self.loggers:
            logger.log_metrics(row, step=step)
        if self.wandb_run is not None:
            self.wandb_run.log(row, step=step)

    def close(self) -> None:
        """Flush and finalize every logger (the files are complete afterwards)."""
        self.flush()
        for logger in self.loggers:
            logger.finalize("success")
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def copy_into(self, out: Path) -> None:
        """The CSV and TensorBoard logs into `out` (the final checkpoint's `logs/`)."""
        for sub in ("csv", "tensorboard"):
            if (self.root / sub).is_dir():
                shutil.copytree(self.root / sub, out / sub, dirs_exist_ok=True)
