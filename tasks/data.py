"""The body of the data step: prepare a dataset artifact (a thin wrapper over
`vinasmol_core.data.prepare_dataset`, logging to the run when there is one).

A plain function: the Prefect task is the `data` step in `tasks.pipeline`. `prepare_dataset` also
keys its output on the *content* of the sources and the tokenizer (not their paths) and returns at
once, doing no work, when the output folder or the store already holds that build.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from vinasmol_core.data import DatasetInfo, PrepareSettings, SourceSpec, SourceStats, prepare_dataset


def prepare_data(
    sources: list[SourceSpec],
    tokenizer_dir: Path,
    out_dir: Path,
    settings: PrepareSettings | None = None,
    store_url: str | None = None,
    ref: str | None = None,
) -> DatasetInfo:
    """Clean, deduplicate, split, tokenize and pack `sources`; publish to `store_url` when given."""
    logger: Any
    try:
        logger = get_run_logger()
    except MissingContextError:  # outside a Prefect run
        logger = logging.getLogger(__name__)

    def done(name: str, s: SourceStats) -> None:
        logger.info("%s: %d docs read, %d removed %s, %d duplicates, %d train / %d val tokens",
                    name, s.docs_read, sum(s.removed.values()), s.removed,
                    s.exact_duplicates + s.near_duplicates, s.train_tokens, s.val_tokens)

    def progress(name: str, s: SourceStats) -> None:
        logger.info("%s: %.1f MB, %d docs so far", name, s.bytes_read / 1e6, s.docs_read)

    info = prepare_dataset(sources, Path(tokenizer_dir), Path(out_dir), settings, store=store_url, ref=ref,
                           on_source_done=done, on_progress=progress)
    logger.info("dataset %s %s; tokens %s", info.key[:12], "reused" if info.reused else "built",
                info.token_counts)
    return info
