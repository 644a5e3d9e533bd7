"""The smoke run's recipe transformation and its projection of the full run."""

from __future__ import annotations

from pathlib import Path

import pytest

from vinasmol_core.plan.recipe import load_recipe
from vinasmol_core.plan.smoke import (
    SMOKE_CORPUS_BYTES,
    SMOKE_SEQ_LEN,
    SMOKE_STEPS,
    projection_rows,
    smoke_recipe,
)

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "recipes" / "smollm2-360m-vi.yaml"


def test_smoke_recipe_makes_two_short_steps_per_stage_and_keeps_the_rest() -> None:
    full = load_recipe(SEED)
    smoke = smoke_recipe(full)
    assert [s.name for s in smoke.stages] == [s.name for s in full.stages]
    for small, big in zip(smoke.stages, full.stages, strict=True):
        assert small.total_steps == SMOKE_STEPS and small.grad_accum == 1
        assert small.seq_len == min(big.seq_len, SMOKE_SEQ_LEN) and small.micro_batch == big.micro_batch
        assert small.checkpoint_interval == 1  # a train-state is written and published
        # what the stage trains, on which data, with which model geometry, is the real recipe's
        for field in ("trainable", "lr", "mixture", "block_size", "rope_base", "precision", "accelerator",
                      "long_context", "schedule"):
            assert getattr(small, field) == getattr(big, field), field
    assert smoke.tokenizer == full.tokenizer and smoke.export == full.export
    assert smoke.base_model == full.base_model
    for small, big in zip(smoke.corpora, full.corpora, strict=True):
        assert (small.name, small.lang, small.role, small.source.dataset) == (
            big.name, big.lang, big.role, big.source.dataset)
        cap = small.source.budget.max_bytes(small.lang)
        assert cap == SMOKE_CORPUS_BYTES < big.source.budget.max_bytes(big.lang)
    assert smoke.eval.max_docs <= 8 and smoke.eval.seq_len <= SMOKE_SEQ_LEN
    assert smoke.eval.max_bytes is not None and smoke.eval.max_bytes <= 4 << 10
    # the long-context and harness checks run after the same stages, on the same tasks, shortened
    assert smoke.eval.long.after == full.eval.long.after and full.eval.long.after
    assert max(smoke.eval.long.passkey_lengths) <= smoke.eval.long.length <= 512 < full.eval.long.length
    assert smoke.eval.long.trials == 1 and smoke.eval.long.max_docs <= 2
    small_h, big_h = smoke.eval.harness, full.eval.harness
    assert (small_h.after, small_h.tasks) == (big_h.after, big_h.tasks)
    assert smoke.eval.harness.limit <= 4 and all(c.items <= 4 for c in smoke.eval.harness.cloze)


def test_projection_is_tokens_over_measured_throughput() -> None:
    full = load_recipe(SEED)
    measured = {s.name: {"tokens_per_s": 1000.0 * (i + 1)} for i, s in enumerate(full.stages)}
    rows = projection_rows(full, measured)
    assert [r["stage"] for r in rows] == [s.name for s in full.stages] + ["all stages"]
    eeve6 = next(r for r in rows if r["stage"] == "eeve-6")
    assert eeve6["hours"] == pytest.approx(1_200_000_000 / 3000.0 / 3600)
    assert rows[-1]["hours"] == pytest.approx(sum(r["hours"] for r in rows[:-1]))
    assert rows[-1]["tokens"] == sum(s.max_tokens for s in full.stages)
    # a stage without a measurement leaves the total unknown rather than too small
    del measured["annealing"]
    rows = projection_rows(full, measured)
    assert rows[-2]["hours"] is None and rows[-1]["hours"] is None


def test_projection_uses_the_micro_batch_search_and_prints_its_set_lines() -> None:
    """Each smoke stage searches at the full run's sequence length up to its batch per device; a stage
    whose search found a micro-batch is projected at the search's tokens/s, and the report gives the
    `--set` lines that apply the choices."""
    from flows.report import projection_markdown

    full = load_recipe(SEED)
    smoke = smoke_recipe(full)
    for big, small in zip(full.stages, smoke.stages, strict=True):
        assert small.micro_batch_search is not None
        assert small.micro_batch_search.seq_len == big.seq_len
        assert small.micro_batch_search.max_micro_batch == big.global_batch // big.world_size
    measured = {s.name: {"tokens_per_s": 1000.0} for s in full.stages}
    measured["eeve-6"]["micro_batch_search"] = {"chosen": 8, "tokens_per_s": 4000.0,
                                                "set": "stages[eeve-6].micro_batch=8"}
    rows = projection_rows(full, measured)
    eeve6 = next(r for r in rows if r["stage"] == "eeve-6")
    assert eeve6["micro_batch"] == 8 and eeve6["hours"] == pytest.approx(1_200_000_000 / 4000.0 / 3600)
    eeve4 = next(r for r in rows if r["stage"] == "eeve-4")
    assert eeve4["micro_batch"] is None and eeve4["tokens_per_s"] == 1000.0
    text = projection_markdown({"projection": rows, "checkpoints": []})
    assert "--set 'stages[eeve-6].micro_batch=8'" in text
