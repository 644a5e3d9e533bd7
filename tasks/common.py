"""Shared machinery of the pipeline's Prefect tasks: cache keys, result storage, timing, the recipe's
corpora as local files.

Every step is declared with `@step(Step.NAME)` (names in `vinasmol_core.common.steps`). A step's cache key
is a hash of

* the step's name,
* its arguments (input artifact digests and the recipe section it reads), minus the arguments
  named in `EXCLUDED_ARGS` or in the step's own `exclude` (store URL, debugging switches),
* `CODE_VERSION`, bumped by hand when a step's semantics change.

It never includes the flow run id or the task's source text, so a fresh run of an unchanged
recipe reuses every finished step, and editing a comment does not throw away a training stage.

Results are the step's manifest, serialized as JSON into Prefect result storage that lives next to
the artifact store (`<store>/prefect-results`), so a retry on another machine finds them.

A `VinaSmolError` is the user's error, explained by its message: Prefect's task- and flow-failure log
lines keep the message and lose the traceback (`quiet_user_errors`, installed on import); any other
exception, a bug, keeps its traceback.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from prefect import task
from prefect.cache_policies import CachePolicy
from pydantic import BaseModel

from vinasmol_core import __version__
from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.data.spec import SourceSpec
from vinasmol_core.plan.recipe import CorpusSpec, HubSource

# Bump the revision when a step would produce something different from the same inputs
# (2: steps renamed after their task functions, `vinasmol_core.common.steps`).
STEP_CODE_REVISION = 2
CODE_VERSION = f"vinasmol-{__version__}/steps-{STEP_CODE_REVISION}"

# Arguments that never enter a cache key: where things are stored and debugging switches.
# (`hub_mirror` is where hub data is read from: its content enters the keys through the digests.)
EXCLUDED_ARGS = frozenset({"store_url", "fail_at_step", "stage_runner", "work_dir", "progress", "hub_mirror"})

TIMING_LOG_ENV = "VINASMOL_TIMING_LOG"

F = TypeVar("F", bound=Callable[..., Any])


def _jsonable(value: Any) -> Any:
    """A stable JSON-compatible view of a step argument (Pydantic models by their JSON dump)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"step argument of type {type(value).__name__} cannot be part of a cache key")


def step_cache_key(step_name: str, arguments: dict[str, Any], exclude: Iterable[str] = ()) -> str:
    """The cache key of one step: its name, its keyed arguments and the code version."""
    skip = EXCLUDED_ARGS | set(exclude)
    keyed = {k: _jsonable(v) for k, v in sorted(arguments.items()) if k not in skip}
    payload = {"step": step_name, "code": CODE_VERSION, "args": keyed}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"{step_name}-{hashlib.sha256(blob.encode()).hexdigest()}"


@dataclass
class StepCachePolicy(CachePolicy):
    """Cache on (step name, keyed inputs, code version); see the module docstring."""

    step_name: str = ""
    exclude: tuple[str, ...] = field(default_factory=tuple)

    def compute_key(
        self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        return step_cache_key(self.step_name or task_ctx.task.name, inputs, self.exclude)


def _record_timing(step_name: str, started: float, duration: float, ok: bool) -> None:
    """Append one line per executed step to $VINASMOL_TIMING_LOG (cached steps never get here)."""
    path = os.environ.get(TIMING_LOG_ENV)
    if not path:
        return
    try:
        from prefect.runtime import flow_run, task_run

        flow_run_id, task_run_id = str(flow_run.id or ""), str(task_run.id or "")
        run_name = str(task_run.name or step_name)
    except Exception:  # outside a run
        flow_run_id = task_run_id = ""
        run_name = step_name
    line = {
        "step": step_name,
        "name": run_name,
        "started": started,
        "duration_s": round(duration, 4),
        "ok": ok,
        "flow_run_id": flow_run_id,
        "task_run_id": task_run_id,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")


class _UserErrorFilter(logging.Filter):
    """Drops the traceback of a log record whose exception is a `VinaSmolError` (the message stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, VinaSmolError):
            record.exc_info = None
            record.exc_text = None
        return True


# Prefect 3 logs a failed task run ("Task run failed with exception: ...") and a failed flow run
# ("Encountered exception during execution: ...") on these loggers, each with the whole traceback.
RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


def quiet_user_errors() -> None:
    """Log a `VinaSmolError` that ends a task or flow run as its message alone, without a traceback,
    on every handler of Prefect's run loggers (console and the UI's API logs)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _UserErrorFilter) for f in logger.filters):
            logger.addFilter(_UserErrorFilter())


quiet_user_errors()


def step(name: str, *, exclude: Iterable[str] = (), retries: int = 0) -> Callable[[F], Any]:
    """Declare a pipeline step as a Prefect task with the project's cache and result settings.

    The task's `.fn` is the plain function (what the tests call, without a Prefect run). The result
    storage is chosen per run by `flows` (`with_options(result_storage=...)`), because
    it lives inside the run's artifact store.
    """
    name, exclude = str(name), tuple(exclude)

    def decorate(fn: F) -> Any:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.time()
            t0 = time.perf_counter()
            ok = False
            try:
                result = fn(*args, **kwargs)
                ok = True
                return result
            finally:
                _record_timing(name, started, time.perf_counter() - t0, ok)

        return task(
            timed,
            name=name,
            cache_policy=StepCachePolicy(step_name=name, exclude=exclude),
            persist_result=True,
            result_serializer="json",
            retries=retries,
        )

    return decorate


def store_root(store_url: str) -> str:
    """The store URL without a trailing slash, file:// paths made absolute."""
    url = store_url.rstrip("/")
    if url.startswith("file://"):
        return "file://" + str(Path(url[len("file://") :]).expanduser().resolve())
    if "://" not in url:
        return "file://" + str(Path(url).expanduser().resolve())
    return url


def result_storage_for(store_url: str) -> Any:
    """A saved Prefect filesystem block that keeps task results under `<store>/prefect-results`.

    file:// → LocalFileSystem, s3:// (and other fsspec URLs) → RemoteFileSystem with credentials
    taken from the environment (AWS_* variables), never written into the block. The block is saved
    under a name derived from the URL, so every machine that runs this store resolves the same one.
    """
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    root = store_root(store_url)
    name = "vinasmol-results-" + hashlib.sha256(root.encode()).hexdigest()[:16]
    if root.startswith("file://"):
        basepath = Path(root[len("file://") :]) / "prefect-results"
        basepath.mkdir(parents=True, exist_ok=True)
        block: Any = LocalFileSystem(basepath=str(basepath))
    elif root.startswith("memory://"):
        block = RemoteFileSystem(basepath=f"{root}/prefect-results")
    else:
        settings: dict[str, Any] = {}
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("VINASMOL_S3_ENDPOINT")
        if endpoint and root.startswith("s3://"):
            settings["client_kwargs"] = {"endpoint_url": endpoint}
        block = RemoteFileSystem(basepath=f"{root}/prefect-results", settings=settings)
    block.save(name, overwrite=True)
    return block


def read_timing_log(path: Path, flow_run_id: str | None = None) -> list[dict[str, Any]]:
    """Lines of a timing log, optionally only those of one flow run."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if flow_run_id is not None:
        rows = [r for r in rows if r.get("flow_run_id") == flow_run_id]
    return rows


def open_store(store_url: str) -> Any:
    """The artifact store a step reads from and publishes to."""
    from vinasmol_core.store import ArtifactStore

    return ArtifactStore(store_url)


@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary folder removed afterwards (outputs are published from it, then dropped)."""
    root = Path(os.environ.get("VINASMOL_WORK_DIR") or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"vinasmol-{prefix}-", dir=root))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def forced_run() -> bool:
    """Whether the running step was forced (`--force`: Prefect's cache is refreshed): a step that also
    reuses a build by key must then build it again. False outside a Prefect task run."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    return bool(ctx is not None and ctx.task.refresh_cache)


def run_logger() -> Any:
    """The Prefect run's logger; a plain logger outside a Prefect run (a step's body called directly)."""
    import logging

    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("vinasmol.tasks")


def slug(text: str) -> str:
    """`text` as an artifact key part: lower case, every other character than a letter or digit a `-`."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-") or "x"


# ----------------------------------------------------------------------------- corpora
def _mirror(hub_mirror: str | None) -> Path | None:
    return Path(hub_mirror) if hub_mirror else None


def hub_source_spec(corpus: CorpusSpec, hub_mirror: str | None = None) -> SourceSpec:
    """The data reader's view of a hub corpus: streamed from the hub (or its mirror folder) up to
    its budget."""
    from vinasmol_core.hub import mirror_dir

    source = corpus.source
    if not isinstance(source, HubSource):
        raise VinaSmolError(f"corpus {corpus.name}: not a hub corpus")
    mirror = _mirror(hub_mirror)
    return SourceSpec(
        name=corpus.name, lang=corpus.lang, role=corpus.role, text_field=corpus.text_field,
        document=corpus.document, id_field=source.id_field, hf_dataset=source.dataset,
        hf_config=source.config, hf_split=source.split, hf_revision=source.revision,
        hf_data_files=tuple(source.data_files),
        hf_path=str(mirror_dir(mirror, source.dataset)) if mirror is not None else None,
        max_docs=source.budget.documents, max_bytes=source.budget.max_bytes(corpus.lang),
        max_tokens=source.budget.tokens,
    )


def corpus_source_spec(corpus: CorpusSpec, out_dir: Path, hub_mirror: str | None = None) -> SourceSpec:
    """The data step's source for one recipe corpus (local files, written samples, or a hub stream)."""
    if isinstance(corpus.source, HubSource):
        return hub_source_spec(corpus, hub_mirror)
    train, _ = materialize_corpus(corpus, out_dir)
    return SourceSpec(name=corpus.name, paths=tuple(str(p) for p in train), lang=corpus.lang,
                      role=corpus.role, text_field=corpus.text_field)


def corpus_rows(corpus: CorpusSpec, out_dir: Path, hub_mirror: str | None = None,
                max_docs: int | None = None, *, val_fraction: float) -> Iterable[Any]:
    """A corpus as `count_words` takes it: its local train files, or a lazy stream of rows of a hub
    corpus (up to its budget, and to `max_docs` when given; read as it is consumed, never held whole)
    without the documents the data step holds out for validation (`val_fraction`, the same stable
    hash: `hub_val_file`)."""
    if not isinstance(corpus.source, HubSource):
        return list(materialize_corpus(corpus, out_dir)[0])
    from vinasmol_core.data.readers import iter_hf_records
    from vinasmol_core.data.worker import split_is_val

    spec = hub_source_spec(corpus, hub_mirror)
    if max_docs is not None:
        spec = spec.model_copy(update={"max_docs": min(max_docs, spec.max_docs or max_docs)})
    return ({"text": text} for doc_id, text in iter_hf_records(spec)
            if text and not split_is_val(corpus.name, doc_id, val_fraction))


def materialize_corpus(corpus: CorpusSpec, out_dir: Path) -> tuple[list[Path], list[Path]]:
    """Local (train, val) JSONL files of one recipe corpus; built-in samples are written to out_dir."""
    source = corpus.source
    if isinstance(source, HubSource):
        raise VinaSmolError(f"corpus {corpus.name}: a hub corpus is streamed, not materialized")
    if source.kind == "files":
        train = [Path(p) for p in source.train]
        val = [Path(p) for p in source.val]
        for path in [*train, *val]:
            if not path.is_file():
                raise VinaSmolError(f"corpus {corpus.name}: file {path} does not exist")
        return train, val
    from vinasmol_core.builtin.sample_corpus import sample_texts

    texts = sample_texts(corpus.lang, source.docs + source.val_docs, source.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, part in (("train", texts[: source.docs]), ("val", texts[source.docs :])):
        path = out_dir / f"{corpus.name}-{split}.jsonl"
        with path.open("w", encoding="utf-8") as fh:
            for i, text in enumerate(part):
                row = {"id": f"{corpus.name}-{split}-{i}", "text": text, "source": corpus.name}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        paths.append([path])
    return paths[0], paths[1]


def corpus_digest(corpus: CorpusSpec, hub_mirror: str | None = None) -> str:
    """What a corpus's content depends on: its spec, and for local files (and hub mirror folders)
    their sha256."""
    h = hashlib.sha256(json.dumps(corpus.model_dump(mode="json"), sort_keys=True).encode())
    source = corpus.source
    if isinstance(source, HubSource):
        from vinasmol_core.data.readers import source_digest

        h.update(source_digest(hub_source_spec(corpus, hub_mirror), []).encode())
    elif source.kind == "files":
        for p in [*source.train, *source.val]:
            path = Path(p)
            if not path.is_file():
                raise VinaSmolError(f"corpus {corpus.name}: file {path} does not exist")
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def hub_val_file(corpus: CorpusSpec, val_fraction: float, hub_mirror: str | None = None) -> Path:
    """The validation documents of a hub corpus as a JSONL file, written once into the local cache
    (`$VINASMOL_CACHE/hub-val/`, keyed on the corpus digest and `val_fraction`): the first
    `val_documents` rows of `val_split`, or else the first `val_documents` documents of
    the train stream that the data step holds out (the same stable hash, `val_fraction`)."""
    from vinasmol_core.data.readers import iter_hf_records
    from vinasmol_core.data.worker import split_is_val
    from vinasmol_core.store.layout import default_cache_dir

    source = corpus.source
    assert isinstance(source, HubSource)
    spec = hub_source_spec(corpus, hub_mirror)
    key = hashlib.sha256(json.dumps([corpus_digest(corpus, hub_mirror), val_fraction]).encode()).hexdigest()
    path = default_cache_dir() / "hub-val" / f"{corpus.name}-{key[:16]}.jsonl"
    if path.is_file():
        return path
    if source.val_split:
        spec = spec.model_copy(update={"max_docs": source.val_documents, "max_bytes": None})
        rows = iter_hf_records(spec, source.val_split)
    else:
        rows = ((i, t) for i, t in iter_hf_records(spec) if split_is_val(corpus.name, i, val_fraction))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    n = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for doc_id, text in rows:
            if not text:
                continue
            fh.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
            n += 1
            if n >= source.val_documents:
                break
    if n == 0:
        tmp.unlink()
        raise VinaSmolError(f"corpus {corpus.name}: no validation documents (set source.val_split, or read "
                            "more of the dataset: its held-out share of the budget is empty)")
    tmp.replace(path)
    return path


def val_files(corpora: list[CorpusSpec], out_dir: Path, languages: list[str], val_fraction: float = 0.0,
              hub_mirror: str | None = None) -> dict[str, list[str]]:
    """Validation files per language, from the main corpora (annealing data never changes evals)."""
    files: dict[str, list[str]] = {}
    for corpus in corpora:
        if corpus.role != "main" or corpus.lang not in languages:
            continue
        if isinstance(corpus.source, HubSource):
            files.setdefault(corpus.lang, []).append(str(hub_val_file(corpus, val_fraction, hub_mirror)))
            continue
        train, val = materialize_corpus(corpus, out_dir / corpus.name)
        files.setdefault(corpus.lang, []).extend(str(p) for p in val or train[:1])
    return files
