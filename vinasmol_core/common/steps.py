"""The names of the pipeline's steps, in pipeline order: the one place they are spelled.

Each step is one cached Prefect task whose function is the step's name with `_` for `-`
(`Step.PREPARE_DATA` = "prepare-data" is `tasks.data.prepare_data`), and one call in the `vinasmol`
flow. A step's name is part of its cache key, the name of its task runs, and what `--force` and
`--from-stage` accept; training stages are named by the recipe (`eeve-3`, ...) and run as the
`train-stage` step.
"""

from __future__ import annotations

from enum import StrEnum


class Step(StrEnum):
    FETCH_BASE_MODEL = "fetch-base-model"
    TRAIN_TOKENIZER = "train-tokenizer"
    MERGE_VOCABULARY = "merge-vocabulary"
    PREPARE_DATA = "prepare-data"
    INIT_EMBEDDINGS = "init-embeddings"
    CONVERT_TO_LITGPT = "convert-to-litgpt"
    UPSCALE_DEPTH = "upscale-depth"  # only with the recipe's `upscale` section, right after convert
    TRAIN_STAGE = "train-stage"
    EVALUATE = "evaluate"
    EXPORT = "export"
    FIT_SWEEP = "fit-sweep"  # the sweep flow's regression (flows/sweep.py), after its proxy runs


# Steps before and after the training stages, in order (the recipe names the stages in between).
STEPS_BEFORE: tuple[Step, ...] = (
    Step.FETCH_BASE_MODEL,
    Step.TRAIN_TOKENIZER,
    Step.MERGE_VOCABULARY,
    Step.PREPARE_DATA,
    Step.INIT_EMBEDDINGS,
    Step.CONVERT_TO_LITGPT,
)
STEPS_AFTER: tuple[Step, ...] = (Step.EVALUATE, Step.EXPORT)
