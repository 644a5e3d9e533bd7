"""A training stage's curves as one Markdown document: loss, learning-rate and tokens/s charts (SVG
images inlined as data URIs), the latest metrics and the evaluations so far. `StageProgress`
(`tasks.train`) publishes it as a new version of the keyed artifact `curves-<stage>` every
`logging.artifact_interval` optimizer steps and at the end."""

from __future__ import annotations

import base64
from typing import Any

from tasks.common import slug

MAX_POINTS = 2000  # per series (more than a chart has pixels); longer: every k-th point and the last


def curves_key(stage: str) -> str:
    return f"curves-{slug(stage)}"


def svg_image(svg: str, alt: str) -> str:
    return f"![{alt}](data:image/svg+xml;base64,{base64.b64encode(svg.encode()).decode()})"


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) <= MAX_POINTS:
        return points
    k = -(-len(points) // MAX_POINTS)
    return points[::k] + ([points[-1]] if (len(points) - 1) % k else [])


def _fmt(value: Any, spec: str = ".4g") -> str:
    return format(value, spec) if isinstance(value, int | float) else ""


def _charts(stage: str, steps: list[dict[str, Any]], evals: list[dict[str, Any]]) -> list[str]:
    from vinasmol_core.common.chart import Series, line_chart_svg

    def series(key: str) -> list[tuple[float, float]]:
        return _thin([(e["step"], e[key]) for e in steps if isinstance(e.get(key), int | float)])

    loss = [Series("train loss", series("loss"))]
    for lang in sorted({lang for e in evals for lang in e.get("val_loss", {})}):
        points = [(e["step"], e["val_loss"][lang]) for e in evals if lang in e.get("val_loss", {})]
        loss.append(Series(f"val loss {lang}", points, dashed=True))
    specs = [
        (loss, f"{stage}: loss", "cross-entropy (nats/token)", "loss curve"),
        ([Series("learning rate", series("lr"))], f"{stage}: learning rate", "learning rate", "lr curve"),
        ([Series("tokens/s", series("tokens_per_s"))], f"{stage}: throughput", "tokens per second",
         "tokens/s curve"),
    ]
    return [
        svg_image(line_chart_svg(s, title=title, x_label="optimizer step", y_label=y_label), alt)
        for s, title, y_label, alt in specs
    ]


def _latest_table(last: dict[str, Any], total: int) -> list[str]:
    rows = [
        ("step", f"{last.get('step', 0)} / {total}"),
        ("training loss", _fmt(last.get("loss"))),
        ("learning rate", _fmt(last.get("lr"))),
        ("gradient norm", _fmt(last.get("grad_norm"))),
        ("tokens", _fmt(last.get("tokens"), ",")),
        ("tokens/s", _fmt(last.get("tokens_per_s"), ",.0f")),
        ("step time (s)", _fmt(last.get("step_time_s"), ".3g")),
    ]
    return ["| metric | latest |", "| --- | ---: |", *(f"| {k} | {v} |" for k, v in rows)]


def _eval_table(evals: list[dict[str, Any]]) -> list[str]:
    langs = sorted({lang for e in evals for lang in e.get("val_bpb", {})})
    if not langs:
        return ["_no evaluation yet_"]
    head = "| step | " + " | ".join(f"loss {lang} | bpb {lang}" for lang in langs) + " |"
    lines = [head, "| ---: |" + " ---: | ---: |" * len(langs)]
    for e in evals:
        loss, bpb = e.get("val_loss") or {}, e["val_bpb"]
        cells = [f"{_fmt(loss.get(lang))} | {_fmt(bpb.get(lang))}" for lang in langs]
        lines.append(f"| {e['step']} | " + " | ".join(cells) + " |")
    return lines


def stage_curves_markdown(
    stage: str, events: list[dict[str, Any]], total_steps: int, state: str = "running"
) -> str:
    """The document for the events so far (`step`, `eval` and `start` events; others are ignored);
    `state` (running, finished, stopped) goes into its title."""
    steps = [e for e in events if e.get("event") == "step" and isinstance(e.get("step"), int)]
    evals = [e for e in events if e.get("event") == "eval" and isinstance(e.get("val_bpb"), dict)]
    start = next((e for e in events if e.get("event") == "start"), {})
    parts = [f"# Training stage `{stage}` ({state})", ""]
    if start.get("resumed_from"):
        parts += [f"Resumed from the train-state of step {start['resumed_from']}.", ""]
    parts += ["## Latest metrics", "", *_latest_table(steps[-1] if steps else {}, total_steps), ""]
    parts += ["## Curves", "", *(f"{img}\n" for img in _charts(stage, steps, evals))]
    parts += ["## Evaluations (validation loss in nats/token, bits per byte)", "", *_eval_table(evals), ""]
    if start.get("log_dir"):
        parts += [f"CSV and TensorBoard logs: `{start['log_dir']}` on the training machine while the "
                  "stage runs, and `logs/` in the final checkpoint.", ""]
    return "\n".join(parts)
