"""The long-context and harness tables and charts: one row per checkpoint, values where they belong."""

from __future__ import annotations

from vinasmol_core.model.eval_tables import (
    harness_markdown,
    long_bpb_markdown,
    long_context_svgs,
    passkey_markdown,
)


def _long(bpbs: list[float], exact: float) -> dict:
    from vinasmol_core.model.long_context import bucket_edges, bucket_label

    edges = bucket_edges(8192)
    buckets = [{"bucket": bucket_label(lo, hi), "start": lo, "end": hi, "bpb": v}
               for lo, hi, v in zip(edges[:-1], edges[1:], bpbs, strict=True)]
    cell = {"exact": exact, "digits": exact, "trials": 2}
    return {"length": 8192, "block_size": 8192, "bpb": {"vi": {"docs": 3, "buckets": buckets}},
            "passkey": {"2048": {"0": cell, "1": cell}, "8192": {"0": cell, "1": {**cell, "exact": 0.0}}}}


def test_long_tables_and_charts() -> None:
    long = {"context-extension": _long([1.2, 1.1, 1.0], 1.0), "eeve-7": _long([1.2, 1.4, 1.9], 0.5)}
    bpb = long_bpb_markdown(long)
    assert "| checkpoint | lang | docs | 0-2k BPB | 2k-4k BPB | 4k-8k BPB |" in bpb
    assert "| eeve-7 | vi | 3 | 1.2000 | 1.4000 | 1.9000 |" in bpb
    pk = passkey_markdown(long)
    assert "| context-extension | 8192 | 1.00 | 0.00 | 0.50 | 1.00 |" in pk
    bpb_svg, pk_svg = long_context_svgs(long)
    assert bpb_svg.count("<polyline") == 2 and 'data-label="eeve-7 vi"' in bpb_svg
    assert 'data-label="context-extension"' in pk_svg


def test_harness_table_rows_are_stages_and_columns_tasks() -> None:
    table = harness_markdown({"base": {"xnli_vi": {"acc": 0.4, "n": 100.0}},
                              "annealing": {"xnli_vi": {"acc": 0.5, "acc_norm": 0.55, "n": 100.0},
                                            "arc_vi": {"acc": 0.3}}})
    lines = table.splitlines()
    assert lines[0] == "| checkpoint | arc_vi | xnli_vi |"
    assert lines[2] == "| base |  | 0.400 n=100 |"
    assert lines[3] == "| annealing | 0.300 | 0.500 (0.550) n=100 |"
