"""The data step, one cached Prefect task (recipe section `data`): `prepare_data` ("prepare-data")
cleans, deduplicates, splits, tokenizes and packs the corpora of one dataset with
`vinasmol_core.data.prepare_dataset` and publishes it (a `DatasetManifest`), logging per source.

`prepare_dataset` also keys its output on the *content* of the sources and the tokenizer (not their
paths) and returns at once, doing no work, when the store already holds that build with all its blobs;
a forced step (`--force`) builds it again.
"""

from __future__ import annotations

from tasks.common import corpus_source_spec, forced_run, open_store, run_logger, scratch_dir, slug, step
from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.common.manifests import DatasetManifest
from vinasmol_core.common.steps import Step
from vinasmol_core.data import PrepareSettings, SourceStats, prepare_dataset
from vinasmol_core.data.curate import filter_table
from vinasmol_core.plan.recipe import CorpusSpec, DataSection


@step(Step.PREPARE_DATA, exclude=("tokenizer_artifact",))
def prepare_data(
    role: str,
    corpora: list[CorpusSpec],
    corpus_digests: dict[str, str],
    section: DataSection,
    tokenizer_sha: str,
    tokenizer_artifact: str,
    store_url: str,
    hub_mirror: str | None = None,
) -> DatasetManifest:
    """Clean, dedup, tokenize and pack the corpora of one dataset (`main`, or `annealing` = main +
    annealing sources). Keyed on the tokenizer's content, not on the artifact that carries it."""
    logger = run_logger()

    def done(name: str, s: SourceStats) -> None:
        logger.info("%s: %d docs read, %d removed %s, %d duplicates, %d train / %d val tokens",
                    name, s.docs_read, sum(s.removed.values()), s.removed,
                    s.exact_duplicates + s.near_duplicates, s.train_tokens, s.val_tokens)

    def progress(name: str, s: SourceStats) -> None:
        logger.info("%s: %.1f MB, %d docs so far", name, s.bytes_read / 1e6, s.docs_read)

    store = open_store(store_url)
    tok_dir = store.fetch(tokenizer_artifact)
    with scratch_dir(f"data-{role}") as tmp:
        sources = [corpus_source_spec(c, tmp / "corpora" / c.name, hub_mirror) for c in corpora]
        settings = PrepareSettings(
            cleaning=section.cleaning, curation=section.curation, val_fraction=section.val_fraction,
            dedup=section.dedup, near_dedup=section.near_dedup,
        )
        info = prepare_dataset(
            sources, tok_dir, tmp / "dataset", settings, store=store_url, ref=f"datasets/{role}",
            on_source_done=done, on_progress=progress, rebuild=forced_run(),
        )
    logger.info("dataset %s %s; tokens %s", info.key[:12], "reused" if info.reused else "built",
                info.token_counts)
    _publish_filter_table(role, [(c.name, c.lang, info.sources[c.name]) for c in corpora
                                 if c.name in info.sources])
    if not info.manifest_digest:
        raise VinaSmolError(f"data ({role}): the dataset was not published to the store")
    manifest = store.get_manifest(info.manifest_digest)
    if not isinstance(manifest, DatasetManifest):
        raise VinaSmolError(f"data ({role}): {info.manifest_digest} is not a dataset artifact")
    return manifest


def _publish_filter_table(role: str, sources: list[tuple[str, str, SourceStats]]) -> None:
    """A Prefect table artifact of what each filter removed and edited, per source (outside a run: none)."""
    from prefect.artifacts import create_table_artifact
    from prefect.context import TaskRunContext

    if TaskRunContext.get() is None:
        return
    rows = filter_table(sources)
    create_table_artifact(table=rows or [{"source": "-", "filter": "nothing removed or edited"}],
                          key=f"data-filters-{slug(role)}",
                          description=f"documents and MB removed or edited per filter and source ({role})")
