"""The SVG line chart behind the loss curves: valid XML, data mapped into the plot area the right
way up, non-finite points dropped, labels escaped."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

from vinasmol_core.common.chart import Series, line_chart_svg, nice_ticks

NS = "{http://www.w3.org/2000/svg}"


def _polylines(svg: str) -> dict[str, list[tuple[float, float]]]:
    root = ET.fromstring(svg)
    out = {}
    for line in root.iter(f"{NS}polyline"):
        out[line.get("data-label")] = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
    return out


def test_points_map_into_the_plot_area_in_order_and_the_right_way_up() -> None:
    train = [(1, 5.0), (2, 4.0), (3, 3.5), (10, 2.0)]
    val = [(5, 3.0), (10, 2.5)]
    svg = line_chart_svg([Series("train", train), Series("val <vi>", val, dashed=True)],
                         title="a & b", x_label="step", y_label="loss", width=600, height=300)
    lines = _polylines(svg)
    assert set(lines) == {"train", "val <vi>"}
    t = lines["train"]
    assert len(t) == 4
    assert all(64 <= x <= 600 - 16 and 32 <= y <= 300 - 44 for x, y in t + lines["val <vi>"])
    assert [x for x, _ in t] == sorted(x for x, _ in t)
    assert t[0][1] < t[-1][1]  # higher loss is drawn higher (smaller SVG y)
    # x is linear in the step: step 10 is as far from step 3 as 7 steps are long
    assert math.isclose((t[3][0] - t[2][0]) / (t[1][0] - t[0][0]), 7.0, rel_tol=1e-2)
    assert lines["val <vi>"][1][0] == t[3][0]  # the same step lands on the same x in every series
    assert "a &amp; b" in svg and len(ET.fromstring(svg).findall(f"{NS}circle")) == 2


def test_non_finite_points_are_dropped_and_empty_series_draw_nothing() -> None:
    svg = line_chart_svg([Series("a", [(0, 1.0), (1, math.nan), (2, math.inf), (3, 2.0)]), Series("b", [])],
                         title="t", x_label="x", y_label="y")
    lines = _polylines(svg)
    assert list(lines) == ["a"] and len(lines["a"]) == 2


def test_ticks_are_round_and_cover_the_range() -> None:
    assert nice_ticks(0, 10) == [0, 2, 4, 6, 8, 10]
    ticks = nice_ticks(1.93, 2.41)
    assert ticks[0] >= 1.93 and ticks[-1] <= 2.41 and len(ticks) >= 3
    assert all(math.isclose(b - a, ticks[1] - ticks[0]) for a, b in zip(ticks, ticks[1:], strict=False))
    assert nice_ticks(3, 3) == [3]
