"""The smoke run: every step of a real recipe on a small slice, and the full run projected from it.

`smoke_recipe` shrinks a recipe: each stage makes two optimizer steps, each one micro-batch (the
recipe's) per device at a short sequence length, with a train-state written after the first so
that checkpointing is exercised too; evaluation reads a few documents (the long-context checks at a
short length, a few harness documents per task); each hub corpus is read up to a few MB (local files
are read whole).

Each smoke stage then searches the full run's micro-batch at the full sequence length (on a GPU:
`vinasmol_core.train.microbatch`): the largest power of two that fits with 10% of the memory free.

`projection_rows` turns the stages' measured tokens/s into hours for the recipe's token budgets:
the search's tokens/s at the chosen micro-batch and full sequence length where a search ran, else the
smoke steps' tokens/s at the smoke sequence length (attention costs more per token at the recipe's
longer sequences, so those hours are a lower bound).
"""

from __future__ import annotations

from typing import Any

from vinasmol_core.plan.recipe import HubSource, Recipe

SMOKE_STEPS = 2
SMOKE_SEQ_LEN = 256
SMOKE_EVAL_DOCS = 8
SMOKE_EVAL_BYTES = 4 << 10
SMOKE_CORPUS_BYTES = 4 << 20
SMOKE_VAL_DOCS = 32
SMOKE_LONG_LEN = 512
SMOKE_HARNESS_LIMIT = 4
SMOKE_NAMESPACE = "smoke"


def smoke_stage_fields(stage: Any) -> dict[str, Any]:
    """The fields a smoke run changes in one stage."""
    seq_len = min(stage.seq_len, SMOKE_SEQ_LEN)
    micro = stage.micro_batch  # the real per-device shape, so tokens/s is that of the real run
    global_batch = micro * stage.world_size
    return {
        "seq_len": seq_len,
        "micro_batch": micro,
        "global_batch": global_batch,
        "max_tokens": SMOKE_STEPS * global_batch * seq_len,
        "warmup_steps": min(stage.warmup_steps, 1),
        "checkpoint_interval": 1,
        "eval_interval": SMOKE_STEPS,
        "eval_sequences": min(stage.eval_sequences, 1),
        "eval_at_start": False,
        "log_interval": 1,
        # the full run's micro-batch, found at its sequence length (on CUDA; `train.microbatch`)
        "micro_batch_search": {
            "seq_len": stage.seq_len, "max_micro_batch": stage.global_batch // stage.world_size,
        },
    }


def smoke_recipe(recipe: Recipe) -> Recipe:
    """`recipe` cut down to a smoke run (see the module docstring); validated like any recipe."""
    data = recipe.model_dump(mode="json", by_alias=True, exclude_unset=False)
    for stage, spec in zip(data["stages"], recipe.stages, strict=True):
        stage.update(smoke_stage_fields(spec))
    for corpus, spec in zip(data["corpora"], recipe.corpora, strict=True):
        if isinstance(spec.source, HubSource):
            limit = spec.source.budget.max_bytes(spec.lang)
            if limit is None or limit > SMOKE_CORPUS_BYTES:
                corpus["source"]["budget"] = {"bytes": SMOKE_CORPUS_BYTES}
            corpus["source"]["val_documents"] = min(spec.source.val_documents, SMOKE_VAL_DOCS)
    data["eval"]["max_docs"] = min(recipe.eval.max_docs or SMOKE_EVAL_DOCS, SMOKE_EVAL_DOCS)
    data["eval"]["seq_len"] = min(recipe.eval.seq_len, SMOKE_SEQ_LEN)
    data["eval"]["max_bytes"] = min(recipe.eval.max_bytes or SMOKE_EVAL_BYTES, SMOKE_EVAL_BYTES)
    long = data["eval"]["long"]
    long["length"] = min(recipe.eval.long.length, SMOKE_LONG_LEN)
    long["passkey_lengths"] = sorted({min(n, long["length"]) for n in recipe.eval.long.passkey_lengths})
    long["max_docs"] = min(recipe.eval.long.max_docs, 2)
    long["trials"] = 1
    harness = data["eval"]["harness"]
    harness["limit"] = min(recipe.eval.harness.limit or SMOKE_HARNESS_LIMIT, SMOKE_HARNESS_LIMIT)
    for cloze in harness["cloze"]:
        cloze["items"] = min(cloze["items"], SMOKE_HARNESS_LIMIT)
    data["stage_defaults"] = {}
    data["mixtures"] = recipe.mixtures
    return Recipe.model_validate(data)


def projection_rows(full: Recipe, measured: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stage of the full recipe: its token budget, the smoke run's tokens/s and the hours it
    projects; a last row with the total. `measured[stage]` holds the stage's summary metrics."""
    rows: list[dict[str, Any]] = []
    total_hours = 0.0
    complete = True
    for stage in full.stages:
        metrics = measured.get(stage.name) or {}
        found = metrics.get("micro_batch_search") or {}
        tps = found.get("tokens_per_s") or metrics.get("tokens_per_s")
        hours = stage.max_tokens / tps / 3600 if tps else None
        complete &= hours is not None
        total_hours += hours or 0.0
        rows.append({"stage": stage.name, "tokens": stage.max_tokens, "steps": stage.total_steps,
                     "seq_len": stage.seq_len, "tokens_per_s": tps, "hours": hours,
                     "micro_batch": found.get("chosen"), "set": found.get("set")})
    rows.append({"stage": "all stages", "tokens": sum(s.max_tokens for s in full.stages),
                 "steps": sum(s.total_steps for s in full.stages), "seq_len": None, "tokens_per_s": None,
                 "hours": total_hours if complete else None})
    return rows
