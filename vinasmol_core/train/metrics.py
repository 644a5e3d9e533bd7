"""Metrics: one JSON object per event, to a JSONL file and to stdout lines a parent process parses."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

METRICS_PREFIX = "@@vinasmol-metrics "
RESULT_PREFIX = "@@vinasmol-result "
ERROR_PREFIX = "@@vinasmol-error "
# a stage's memory figures, in its start event and its manifest's metrics (`relora`: whether it ran ReLoRA)
MEMORY_KEYS = (
    "trainable_params",
    "optimizer_state_bytes",
    "full_rank_trainable_params",
    "full_rank_optimizer_state_bytes",
    "relora",
)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def print_line(line: str) -> None:
    """A stage process's way to announce: one stdout line, flushed, for the parent to parse."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class MetricsSink:
    """Appends events to `path` (and an optional copy), announces them as METRICS_PREFIX lines
    (`announce`: stdout by default; a stage run in the caller's process hands them to the caller's
    parser) and hands them to `loggers` (an object with `on_event`, e.g. `loggers.StageLoggers`)."""

    def __init__(
        self,
        path: Path,
        copy_to: Path | None = None,
        enabled: bool = True,
        loggers: Any = None,
        announce: Callable[[str], None] = print_line,
    ) -> None:
        self.path = path
        self.copy_to = copy_to
        self.enabled = enabled
        self.loggers = loggers
        self.announce = announce

    def emit(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(_clean(event), sort_keys=True, ensure_ascii=False)
        for target in (self.path, self.copy_to):
            if target is not None:
                with open(target, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
        self._announce(line, event)

    def replay(self, events: list[dict[str, Any]]) -> None:
        """A resumed stage's restored `step` and `eval` events, as one `history` event on stdout and to
        the loggers (not appended to the file, which already holds them)."""
        past = [e for e in events if e.get("event") in ("step", "eval")]
        if not self.enabled or not past:
            return
        event = {"event": "history", "events": past}
        self._announce(json.dumps(_clean(event), sort_keys=True, ensure_ascii=False), event)

    def _announce(self, line: str, event: dict[str, Any]) -> None:
        self.announce(METRICS_PREFIX + line)
        if self.loggers is not None:
            self.loggers.on_event(event)


def parse_line(line: str, on_metrics: Callable[[dict[str, Any]], None] | None) -> tuple[str, Any] | None:
    """Classify one stdout line of a stage process: ('metrics'|'result'|'error', payload) or None."""
    for prefix, kind in ((METRICS_PREFIX, "metrics"), (RESULT_PREFIX, "result"), (ERROR_PREFIX, "error")):
        if line.startswith(prefix):
            try:
                payload = json.loads(line[len(prefix) :])
            except ValueError:
                return None
            if kind == "metrics" and on_metrics is not None:
                on_metrics(payload)
            return kind, payload
    return None


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss_curve(events: list[dict[str, Any]], out_svg: Path, title: str) -> None:
    """Training loss per step, validation loss per language at each evaluation, as an SVG file."""
    from vinasmol_core.common.chart import Series, line_chart_svg

    series = [Series("train loss", [(e["step"], e["loss"]) for e in events if e.get("event") == "step"])]
    evals = [e for e in events if e.get("event") == "eval"]
    for lang in sorted({lang for e in evals for lang in e.get("val_loss", {})}):
        points = [(e["step"], e["val_loss"][lang]) for e in evals if lang in e.get("val_loss", {})]
        series.append(Series(f"val loss {lang}", points, dashed=True))
    svg = line_chart_svg(series, title=title, x_label="optimizer step", y_label="cross-entropy (nats/token)")
    out_svg.write_text(svg, encoding="utf-8")
