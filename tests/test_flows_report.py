"""The run report: the bits-per-byte chart under its table, one line per language over the
checkpoints in pipeline order; the CLI's text has no image; the table of trainable parameters and
optimizer state per stage."""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET

from flows.report import bpb_chart_svg, memory_markdown, summary_markdown

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


def test_memory_table_shows_relora_beside_its_full_rank_figures() -> None:
    rows = [
        {"stage": "eeve-3", "step": 4, "ref": "r/eeve-3", "digest": "a", "memory": {}},
        {
            "stage": "eeve-6", "step": 4, "ref": "r/eeve-6", "digest": "b",
            "memory": {
                "trainable_params": 1_000_000, "optimizer_state_bytes": 8 * 2**20,
                "full_rank_trainable_params": 3_000_000, "full_rank_optimizer_state_bytes": 24 * 2**20,
                "relora": True,
            },
        },
    ]
    table = memory_markdown(rows)
    assert "| eeve-6 | yes | 1,000,000 | 8.0 | 3,000,000 | 24.0 |" in table
    assert "| eeve-3 |" not in table  # a stage without figures (an older checkpoint) is left out
    assert memory_markdown([{"stage": "x"}]) == "_no stage recorded its trainable parameters_"
    result = {"recipe": "r", "store": "file:///s", "bpb": {}, "checkpoints": rows,
              "export": {"ref": "e", "digest": "d"}}
    summary = summary_markdown(result)
    assert "## Trainable parameters and optimizer state per stage" in summary and table in summary


def test_summary_shows_each_sources_planned_and_kept_tokens() -> None:
    rows = [
        {"role": "main", "source": "viwiki", "planned_tokens": 300_000_000, "train_tokens": 246_100_000,
         "read_mb": 1234.5},
        {"role": "main", "source": "code", "planned_tokens": None, "train_tokens": 5_000, "read_mb": 0.1},
    ]
    md = summary_markdown({**result(), "data_sources": rows})
    section = md[md.index("## Training tokens per source"):]
    assert "| main | viwiki | 300,000,000 | 246,100,000 | 82.0% | 1,234.5 |" in section
    assert "| main | code |  | 5,000 |  | 0.1 |" in section  # a document budget plans no tokens
    assert "## Training tokens per source" not in summary_markdown(result())
