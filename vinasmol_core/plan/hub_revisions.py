"""Hub corpora pinned to commits before a run: a corpus at a branch or tag (`revision: main`, or
unset) is read, and keyed, at the commit that revision points at when the run is planned, so that a
dataset changed upstream gets new keys (corpus digest, dataset key, validation file) instead of
reusing the builds made from its old data.

Where the commit comes from: the hub (the preflight check's answer), or offline the HF cache's ref.
A corpus read from a hub mirror, or from a local folder named like its hub id, is keyed on that
folder's content instead (`vinasmol_core.data.readers.source_digest`) and left as it is.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.hub import resolve_dataset_revision
from vinasmol_core.plan.recipe import CorpusSpec, HubSource, Recipe

log = logging.getLogger(__name__)


def pin_corpus(corpus: CorpusSpec, mirror: Path | None, strict: bool = True) -> tuple[CorpusSpec, str]:
    """The corpus with its hub revision replaced by the commit it points at now, and a line saying how
    it is keyed. `strict`: a revision that resolves to no commit is an error (else it is kept, keyed
    by its name, with a warning)."""
    source = corpus.source
    if not isinstance(source, HubSource):
        return corpus, ""
    rev = source.revision or "main"
    if mirror is not None:
        return corpus, f"corpus {corpus.name}: read from the hub mirror, keyed on its folder's content"
    if os.path.isdir(source.dataset):
        return corpus, (f"corpus {corpus.name}: read from the local folder {source.dataset}, keyed on its "
                        "content")
    commit, where = resolve_dataset_revision(source.dataset, source.revision)
    if commit is None:
        msg = (f"corpus {corpus.name}: cannot resolve {source.dataset} @ {rev} to a commit (offline, and "
               "not in the HF cache)")
        if strict:
            raise VinaSmolError(f"{msg}; pin source.revision to a full commit hash, or read it from a hub "
                                "mirror (--hub-mirror)")
        log.warning("%s: keyed on the revision's name, so a change upstream is not seen", msg)
        return corpus, f"{msg}; keyed on the revision's name"
    if commit == source.revision:
        return corpus, f"corpus {corpus.name}: {source.dataset} pinned at {commit}"
    pinned = corpus.model_copy(update={"source": source.model_copy(update={"revision": commit})})
    return pinned, (f"corpus {corpus.name}: {source.dataset} @ {rev} is commit {commit} ({where}); read and "
                    "keyed at it")


def pin_hub_revisions(recipe: Recipe, mirror: Path | None, strict: bool = True) -> tuple[Recipe, list[str]]:
    """The recipe with every hub corpus pinned (`pin_corpus`), and one line per hub corpus, also logged."""
    corpora: list[CorpusSpec] = []
    lines: list[str] = []
    for corpus in recipe.corpora:
        pinned, line = pin_corpus(corpus, mirror, strict)
        corpora.append(pinned)
        if line:
            lines.append(line)
            log.info("%s", line)
    return recipe.model_copy(update={"corpora": corpora}), lines
