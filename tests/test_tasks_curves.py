"""The stage curves document: three charts with every logged step, the latest metrics, the
evaluations so far; long series thinned to a bound."""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET

from tasks.curves import MAX_POINTS, curves_key, stage_curves_markdown

NS = "{http://www.w3.org/2000/svg}"


def svgs(markdown: str) -> list[ET.Element]:
    blobs = re.findall(r"data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)\)", markdown)
    return [ET.fromstring(base64.b64decode(b)) for b in blobs]


def polylines(svg: ET.Element) -> dict[str, int]:
    return {p.get("data-label"): len(p.get("points").split()) for p in svg.iter(f"{NS}polyline")}


def events(n: int) -> list[dict]:
    out: list[dict] = [{"event": "start", "resumed_from": None, "log_dir": "/logs/eeve-6/abc"}]
    for step in range(1, n + 1):
        out.append({"event": "step", "step": step, "loss": 5.0 - step / n, "lr": 1e-3 * step / n,
                    "tokens": 128 * step, "tokens_per_s": 1000.0 + step, "grad_norm": 0.5,
                    "step_time_s": 0.1})
        if step % 3 == 0:
            out.append({"event": "eval", "step": step, "val_loss": {"vi": 4.0, "en": 3.5},
                        "val_bpb": {"vi": 1.25, "en": 1.5}})
        out.append({"event": "checkpoint", "step": step})
    return out


def test_three_charts_with_every_logged_step_and_the_tables() -> None:
    md = stage_curves_markdown("eeve-6", events(7), total_steps=10)
    loss, lr, tps = (polylines(s) for s in svgs(md))
    assert loss == {"train loss": 7, "val loss en": 2, "val loss vi": 2}
    assert lr == {"learning rate": 7} and tps == {"tokens/s": 7}
    assert "| step | 7 / 10 |" in md and "| tokens | 896 |" in md and "(running)" in md
    assert "| 3 | 4 | 1.25 | 3.5 | 1.5 |" not in md  # columns are per language, en before vi
    assert "| 3 | 3.5 | 1.5 | 4 | 1.25 |" in md and "| 6 |" in md
    assert "/logs/eeve-6/abc" in md
    assert curves_key("Context Extension") == "curves-context-extension"


def test_before_any_step_and_when_finished() -> None:
    md = stage_curves_markdown("eeve-3", [{"event": "start"}], total_steps=4, state="finished")
    assert "(finished)" in md and "_no evaluation yet_" in md and "| step | 0 / 4 |" in md
    assert len(svgs(md)) == 3


def test_a_long_stage_is_thinned_to_the_bound_and_keeps_the_last_step() -> None:
    n = 3 * MAX_POINTS + 1
    md = stage_curves_markdown("eeve-6", events(n), total_steps=n, state="finished")
    loss = svgs(md)[0]
    [train] = [p for p in loss.iter(f"{NS}polyline") if p.get("data-label") == "train loss"]
    points = train.get("points").split()
    assert len(points) <= MAX_POINTS + 1
    assert f"| step | {n:} / {n} |" in md
