"""The run's report: per-stage metrics tables, a loss-curve image and a Markdown summary (with a chart
of bits per byte per checkpoint and language under its table), as Prefect artifacts (and as plain
text for the CLI)."""

from __future__ import annotations

from typing import Any

from tasks.common import slug
from tasks.curves import svg_image
from vinasmol_core.model.eval_tables import (
    harness_markdown,
    long_bpb_markdown,
    long_context_markdown,
    passkey_markdown,
)


def metrics_rows(events: list[dict[str, Any]], limit: int = 200) -> list[dict[str, Any]]:
    """Training events (those with a loss) as table rows, thinned to at most `limit` rows."""
    rows = [e for e in events if "loss" in e]
    if len(rows) > limit:
        k = -(-len(rows) // limit)
        rows = rows[::k] + [rows[-1]]
    keys = ["step", "loss", "lr", "tokens", "tokens_per_s", "val_bpb", "val_loss", "elapsed_s"]
    out = []
    for e in rows:
        row = {k: e[k] for k in keys if k in e}
        for k, v in e.items():
            if k not in row and isinstance(v, (int, float)) and len(row) < 10:
                row[k] = v
        out.append(row)
    return out


def loss_curve_svg(stages: list[tuple[str, list[dict[str, Any]]]]) -> str | None:
    """One SVG: training loss against the step counted over all stages, one colour per stage."""
    from vinasmol_core.common.chart import Series, line_chart_svg

    series, offset = [], 0
    for name, events in stages:
        points = [(offset + e["step"], e["loss"]) for e in events if "loss" in e and "step" in e]
        if points:
            series.append(Series(name, points))
            offset = points[-1][0]
    if not series:
        return None
    return line_chart_svg(series, title="training loss", x_label="optimizer step (all stages)",
                          y_label="training loss")


def bpb_markdown(bpb: dict[str, dict[str, float]]) -> str:
    """Rows: checkpoints in pipeline order; columns: languages."""
    if not bpb:
        return "_no evaluation_"
    langs = sorted({lang for row in bpb.values() for lang in row})
    lines = ["| checkpoint | " + " | ".join(langs) + " |", "| --- |" + " ---: |" * len(langs)]
    for label, row in bpb.items():
        cells = [f"{row[lang]:.4f}" if lang in row else "" for lang in langs]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bpb_chart_svg(bpb: dict[str, dict[str, float]]) -> str | None:
    """Bits per byte per language (one line each) over the checkpoints in pipeline order."""
    from vinasmol_core.common.chart import Series, line_chart_svg

    labels = list(bpb)
    langs = sorted({lang for row in bpb.values() for lang in row})
    series = [
        Series(lang, [(i, bpb[label][lang]) for i, label in enumerate(labels) if lang in bpb[label]],
               markers=True)
        for lang in langs
    ]
    if not any(s.points for s in series):
        return None
    return line_chart_svg(series, title="bits per byte on validation text (lower is better)",
                          x_label="checkpoint", y_label="bits per byte", x_names=labels)


def mixture_markdown(checkpoints: list[dict[str, Any]]) -> str:
    """Per stage and source, the share asked for and the share drawn; a stage's warnings below."""
    lines = ["| stage | source | requested | effective |", "| --- | --- | ---: | ---: |"]
    warnings = []
    for row in checkpoints:
        for source, share in row.get("mixture", {}).items():
            cells = f"{share['requested']:.4f} | {share['effective']:.4f}"
            lines.append(f"| {row['stage']} | {source} | {cells} |")
        warnings += [f"- **warning**, stage {row['stage']}: {w}" for w in row.get("mixture_warnings", [])]
    if len(lines) == 2:
        return "_no stage recorded its mixture_"
    return "\n".join(lines + ([""] + warnings if warnings else []))


def _cell(value: Any, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _hours(value: float | None) -> str:
    """Hours to three significant digits (a tiny recipe's smoke projects fractions of an hour)."""
    if value is None:
        return ""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def steps_markdown(result: dict[str, Any]) -> str:
    """One row per step of the run: wall time, peak host memory (the flow's process tree; for a
    training stage, the larger of that and its training process's own peak), and for a training
    stage its tokens/s and peak GPU memory."""
    stages = {row["stage"]: row.get("metrics", {}) for row in result.get("checkpoints", [])}
    lines = ["| step | wall s | peak host MB | train tokens/s | peak GPU MB | cached |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for row in result.get("steps", []):
        name = row["step"]
        metrics = stages.get(name.removeprefix("train-stage-"), {}) if name.startswith("train-stage-") else {}
        host = max(row["peak_host_mb"], metrics.get("peak_host_mb", 0.0))
        lines.append(
            f"| {name} | {row['seconds']:.1f} | {host:,.0f} | {_cell(metrics.get('tokens_per_s'), ',.0f')} "
            f"| {_cell(metrics.get('peak_gpu_mb'), ',.0f')} | {'yes' if row['cached'] else ''} |"
        )
    return "\n".join(lines)


def projection_markdown(result: dict[str, Any]) -> str:
    """The full run projected from a smoke run's tokens/s, on the device the stages ran on, with the
    micro-batch each stage's search found (and the `--set` lines that apply it)."""
    devices = sorted({str(r.get("metrics", {}).get("device")) for r in result.get("checkpoints", [])
                      if r.get("metrics", {}).get("device")})
    rows = result["projection"]
    lines = [f"Device: {', '.join(devices) or 'unknown'}. Tokens/s: where a micro-batch search ran, its "
             "forward and backward pass at the found micro-batch and the full sequence length (an upper "
             "bound); else the smoke steps at the smoke sequence length (longer sequences cost more per "
             "token). Either way the hours are a lower bound.", "",
             "| stage | tokens | steps | seq len | micro-batch found | tokens/s | projected hours |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(
            f"| {row['stage']} | {row['tokens']:,} | {row['steps']:,} | {_cell(row['seq_len'], ',')} "
            f"| {_cell(row.get('micro_batch'), ',')} | {_cell(row['tokens_per_s'], ',.0f')} "
            f"| {_hours(row['hours'])} |"
        )
    sets = [row["set"] for row in rows if row.get("set")]
    if sets:
        lines += ["", "To run with the micro-batches found:", "",
                  "    " + " ".join(f"--set '{line}'" for line in sets)]
    return "\n".join(lines)


def memory_markdown(checkpoints: list[dict[str, Any]]) -> str:
    """Per stage: trainable parameters and AdamW state as trained, and the same stage at full rank
    (they differ only where the stage ran ReLoRA)."""
    lines = [
        "| stage | ReLoRA | trainable params | AdamW state MiB | full-rank params | full-rank AdamW MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in checkpoints:
        mem = row.get("memory") or {}
        if "trainable_params" not in mem:
            continue
        relora = "yes" if mem.get("relora") else "no"
        lines.append(
            f"| {row['stage']} | {relora} | {mem['trainable_params']:,} | "
            f"{mem.get('optimizer_state_bytes', 0) / 2**20:.1f} | "
            f"{mem.get('full_rank_trainable_params', 0):,} | "
            f"{mem.get('full_rank_optimizer_state_bytes', 0) / 2**20:.1f} |"
        )
    return "\n".join(lines) if len(lines) > 2 else "_no stage recorded its trainable parameters_"


def data_sources_markdown(rows: list[dict[str, Any]]) -> str:
    """Per dataset and source: the training tokens its budget planned, those it really kept after
    cleaning, curation and dedup, and the raw text read for them."""
    lines = ["| dataset | source | planned tokens | kept tokens | kept / planned | read MB |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        planned, kept = row.get("planned_tokens"), row["train_tokens"]
        ratio = f"{kept / planned:.1%}" if planned else ""
        lines.append(f"| {row['role']} | {row['source']} | {_cell(planned, ',')} | {kept:,} | {ratio} "
                     f"| {row['read_mb']:,.1f} |")
    return "\n".join(lines)


def summary_markdown(result: dict[str, Any], charts: bool = False) -> str:
    """The run summary: fertility, bits per byte per stage and language, checkpoints and export.
    `charts`: the bits-per-byte chart under its table (an inline SVG image, for the Prefect UI)."""
    parts = [f"# VinaSmol run: {result['recipe']}", ""]
    parts += [f"Store: `{result['store']}`", ""]
    parts += [
        "## Tokenizer fertility (tokens per word, lower is better)",
        "",
        result.get("fertility_markdown") or "_not computed in this run_",
        "",
    ]
    parts += ["## Bits per byte on validation text (lower is better)", "", bpb_markdown(result["bpb"]), ""]
    chart = bpb_chart_svg(result["bpb"]) if charts else None
    if chart is not None:
        parts += [svg_image(chart, "bits per byte per checkpoint and language"), ""]
    if result.get("long"):
        parts += ["## Long context: bits per byte by position", "", long_bpb_markdown(result["long"]), ""]
        parts += ["## Long context: passkey retrieval", "", passkey_markdown(result["long"]), ""]
    if result.get("harness"):
        parts += ["## Benchmarks (lm-evaluation-harness: acc (acc_norm), documents)", "",
                  harness_markdown(result["harness"]), ""]
    parts += [
        "## Checkpoints",
        "",
        "| stage | steps | ref | manifest digest |",
        "| --- | ---: | --- | --- |",
    ]
    for row in result["checkpoints"]:
        parts.append(f"| {row['stage']} | {row.get('step', '')} | `{row['ref']}` | `{row['digest']}` |")
    if result.get("data_sources"):
        parts += ["", "## Training tokens per source (planned by the budget, kept by the data step)", ""]
        parts.append(data_sources_markdown(result["data_sources"]))
    parts += ["", "## Data mixture per stage (requested and effective share of sequences)", ""]
    parts.append(mixture_markdown(result["checkpoints"]))
    parts += ["", "## Trainable parameters and optimizer state per stage", ""]
    parts.append(memory_markdown(result["checkpoints"]))
    exp = result["export"]
    parts += ["", "## Hugging Face export", "", f"ref `{exp['ref']}`, manifest `{exp['digest']}`"]
    if exp.get("path"):
        parts.append(f"\nfolder: `{exp['path']}`")
    if result.get("steps"):
        parts += ["", "## Steps of this run", "", steps_markdown(result)]
    if result.get("projection"):
        parts += ["", "## Projection of the full run from this smoke run", "", projection_markdown(result)]
    return "\n".join(parts) + "\n"


def publish_artifacts(result: dict[str, Any], stage_events: list[tuple[str, list[dict[str, Any]]]]) -> None:
    """Create the run's Prefect artifacts (tables, loss curve, summary). Call inside the flow run."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    for name, events in stage_events:
        rows = metrics_rows(events)
        if rows:
            create_table_artifact(
                table=rows, key=f"metrics-{slug(name)}", description=f"training metrics of stage {name}"
            )
    svg = loss_curve_svg(stage_events)
    if svg is not None:
        create_markdown_artifact(
            markdown=f"## Training loss\n\n{svg_image(svg, 'loss curve')}\n",
            key="loss-curve",
            description="training loss over all stages",
        )
    if result.get("long"):
        create_markdown_artifact(markdown=long_context_markdown(result["long"]), key="long-context",
                                 description="bits per byte by position bucket and passkey retrieval")
    if result.get("harness"):
        tasks = sorted({t for row in result["harness"].values() for t in row})
        rows = [{"stage": label, **{t: row.get(t, {}).get("acc") for t in tasks}}
                for label, row in result["harness"].items()]
        create_table_artifact(table=rows, key="harness", description="lm-evaluation-harness acc per stage")
    create_markdown_artifact(
        markdown=summary_markdown(result, charts=True),
        key=f"summary-{slug(result['recipe'])}",
        description="fertility, bits per byte per stage and language, checkpoints, export",
    )
