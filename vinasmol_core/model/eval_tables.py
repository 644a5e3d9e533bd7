"""Markdown tables and SVG charts of the long-context and harness evaluations: one checkpoint's (the
CLI) or a run's, one row per checkpoint (the run's artifacts)."""

from __future__ import annotations

import base64
from typing import Any


def long_bpb_markdown(long: dict[str, dict[str, Any]]) -> str:
    """Rows: checkpoint and language; columns: position buckets (bits per byte), documents."""
    if not long:
        return "_no long-context evaluation_"
    buckets = [b["bucket"] for b in next(iter(next(iter(long.values()))["bpb"].values()))["buckets"]]
    lines = ["| checkpoint | lang | docs | " + " | ".join(f"{b} BPB" for b in buckets) + " |",
             "| --- | --- | ---: |" + " ---: |" * len(buckets)]
    for label, rep in long.items():
        for lang, row in rep["bpb"].items():
            cells = " | ".join(f"{b['bpb']:.4f}" for b in row["buckets"])
            lines.append(f"| {label} | {lang} | {row['docs']} | {cells} |")
    return "\n".join(lines)


def passkey_markdown(long: dict[str, dict[str, Any]]) -> str:
    """Rows: checkpoint and prompt length; columns: needle depth (exact retrieval), then the means."""
    rows = [(label, length, cells) for label, rep in long.items() for length, cells in rep["passkey"].items()]
    if not rows:
        return "_no passkey test_"
    depths = list(rows[0][2])
    lines = ["| checkpoint | length | " + " | ".join(f"depth {d}" for d in depths) + " | exact | digits |",
             "| --- | ---: |" + " ---: |" * (len(depths) + 2)]
    for label, length, cells in rows:
        exact = [cells[d]["exact"] for d in depths]
        digits = sum(cells[d]["digits"] for d in depths) / len(depths)
        lines.append(f"| {label} | {length} | " + " | ".join(f"{v:.2f}" for v in exact)
                     + f" | {sum(exact) / len(exact):.2f} | {digits:.2f} |")
    return "\n".join(lines)


def long_context_svgs(long: dict[str, dict[str, Any]]) -> list[str]:
    """Two charts: bits per byte against token position (bucket ends), passkey accuracy against length."""
    from vinasmol_core.common.chart import Series, line_chart_svg

    bpb, passkey = [], []
    for label, rep in long.items():
        for lang, row in rep["bpb"].items():
            points = [(b["end"], b["bpb"]) for b in row["buckets"]]
            bpb.append(Series(f"{label} {lang}", points, dashed=True))
        acc = [(int(n), sum(c["exact"] for c in cells.values()) / len(cells))
               for n, cells in rep["passkey"].items()]
        if acc:
            passkey.append(Series(label, sorted(acc), dashed=True))
    out = [line_chart_svg(bpb, title="bits per byte by position", x_label="end of bucket (token position)",
                          y_label="bits per byte")]
    if passkey:
        out.append(line_chart_svg(passkey, title="passkey retrieval", x_label="prompt length (tokens)",
                                  y_label="exact retrieval (mean over depths)"))
    return out


def harness_markdown(harness: dict[str, dict[str, dict[str, float]]]) -> str:
    """Rows: checkpoints (stages); columns: harness tasks, `acc` (and `acc_norm`)."""
    if not harness:
        return "_no harness evaluation_"
    tasks = sorted({t for row in harness.values() for t in row})
    lines = ["| checkpoint | " + " | ".join(tasks) + " |", "| --- |" + " ---: |" * len(tasks)]
    for label, row in harness.items():
        cells = []
        for task in tasks:
            sc = row.get(task, {})
            main = next((f"{sc[m]:.3f}" for m in ("acc", "exact_match", "f1") if m in sc), "")
            norm = f" ({sc['acc_norm']:.3f})" if "acc_norm" in sc else ""
            cells.append(main + norm + (f" n={int(sc['n'])}" if "n" in sc else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def long_context_markdown(long: dict[str, dict[str, Any]]) -> str:
    """The long-context artifact: both tables and both charts (SVG as data URIs)."""
    parts = ["## Bits per byte by position (lower is better; later buckets at or below the first: "
             "the long context is used)", "", long_bpb_markdown(long), "",
             "## Passkey retrieval (share of prompts whose key greedy decoding returns)", "",
             passkey_markdown(long), ""]
    for svg in long_context_svgs(long):
        uri = "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()
        parts += [f"![chart]({uri})", ""]
    return "\n".join(parts)
