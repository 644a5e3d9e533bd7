"""The run summary's table of trainable parameters and optimizer state per stage."""

from __future__ import annotations

from flows.report import memory_markdown, summary_markdown


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
