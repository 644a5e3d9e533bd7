"""The run report: the bits-per-byte chart under its table, one line per language over the
checkpoints in pipeline order; the CLI's text has no image."""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET

from flows.report import bpb_chart_svg, summary_markdown

NS = "{http://www.w3.org/2000/svg}"
BPB = {
    "base": {"vi": 3.0, "en": 1.0},
    "init": {"vi": 2.0, "en": 1.1},
    "eeve-3": {"vi": 1.5, "en": 1.05, "code": 0.8},
}


def test_bpb_chart_has_a_line_per_language_over_the_checkpoints() -> None:
    svg = ET.fromstring(bpb_chart_svg(BPB))
    lines = {p.get("data-label"): p.get("points").split() for p in svg.iter(f"{NS}polyline")}
    assert {k: len(v) for k, v in lines.items()} == {"code": 1, "en": 3, "vi": 3}
    texts = [t.text for t in svg.iter(f"{NS}text")]
    assert ["base", "init", "eeve-3"] == [t for t in texts if t in BPB]
    vi = [tuple(map(float, p.split(","))) for p in lines["vi"]]
    assert vi[0][1] < vi[2][1]  # vi falls from base to eeve-3: drawn lower
    assert lines["code"][0].split(",")[0] == lines["vi"][2].split(",")[0]  # code only at eeve-3
    assert bpb_chart_svg({}) is None


def result() -> dict:
    return {"recipe": "r", "store": "file:///s", "bpb": BPB, "checkpoints": [],
            "export": {"ref": "runs/r/export", "digest": "d"}}


def test_summary_artifact_has_the_chart_right_after_the_table() -> None:
    md = summary_markdown(result(), charts=True)
    table_end = md.index("| eeve-3 |")
    image = md.index("![bits per byte per checkpoint and language](data:image/svg+xml;base64,")
    assert table_end < image < md.index("## Checkpoints")
    blob = re.search(r"base64,([A-Za-z0-9+/=]+)\)", md).group(1)
    assert ET.fromstring(base64.b64decode(blob)).tag == f"{NS}svg"
    assert "data:image" not in summary_markdown(result())
