"""Downstream benchmarks through lm-evaluation-harness, used as a library.

The model reaches the harness as a Hugging Face folder: an HF checkpoint as it is, a litgpt
checkpoint through `export_hf` into a scratch folder (logits parity checked), so no one converts by
hand. Tasks are the harness's own (`belebele_vie_Latn`, `xnli_vi`, ...) or local ones: task YAML
files over local JSONL in an `include_path` folder, the harness's custom-task mechanism.
`write_choice_task` writes such a multiple-choice task; `cloze_items` builds one from documents
(choose the true next sentence among four).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.model import hf_io
from vinasmol_core.model.litgpt_io import LIT_CONFIG, LIT_WEIGHTS

# The metrics kept per task (the harness reports "acc,none", "acc_norm,none", ...).
METRICS = ("acc", "acc_norm", "exact_match", "f1")


def write_choice_task(folder: Path, name: str, items: list[dict[str, Any]]) -> Path:
    """A multiple-choice task `name` in `folder`: `<name>.jsonl` (context, choices, label) and
    `<name>.yaml` for the harness. Scored by the log-likelihood of each choice after the context
    (`acc`, and `acc_norm` per byte of the choice)."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise VinaSmolError(f"task name {name!r}: use letters, digits and underscores")
    for i, item in enumerate(items):
        if set(item) < {"context", "choices", "label"} or not 0 <= item["label"] < len(item["choices"]):
            raise VinaSmolError(f"task {name}: item {i} needs context, choices and a label within them")
    folder.mkdir(parents=True, exist_ok=True)
    data = (folder / f"{name}.jsonl").resolve()
    data.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
    config = {
        "task": name,
        "dataset_path": "json",
        # the datasets library's cache of the parsed file stays beside it, not in the user's home
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder.resolve() / ".cache")},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(config, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")  # JSON is YAML
    return path


_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def cloze_items(
    docs: list[str], n_items: int, *, context_sentences: int = 2, choices: int = 4, seed: int = 0
) -> list[dict[str, Any]]:
    """Next-sentence cloze items: a document's sentences as context, its true next sentence and
    `choices - 1` sentences of other documents (those closest in length, so that length says
    little) as the choices, in a seeded random order."""
    rng = random.Random(seed)
    split = [[s.strip() for s in _SENTENCE.split(d) if 20 <= len(s.strip()) <= 300] for d in docs]
    pool = [(i, s) for i, sents in enumerate(split) for s in sents]
    items: list[dict[str, Any]] = []
    for i, sents in enumerate(split):
        if len(items) >= n_items:
            break
        if len(sents) <= context_sentences:
            continue
        start = rng.randrange(len(sents) - context_sentences)
        context = " ".join(sents[start : start + context_sentences])
        true = sents[start + context_sentences]
        others = [s for j, s in rng.sample(pool, min(len(pool), 64)) if j != i and s != true]
        others = sorted(set(others), key=lambda s: (abs(len(s) - len(true)), s))[: choices - 1]
        if len(others) < choices - 1:
            continue
        options = [true, *others]
        rng.shuffle(options)
        items.append({"context": context, "choices": options, "label": options.index(true)})
    return items


def _hf_folder(model_dir: Path, tmp: Path) -> Path:
    """The model as an HF folder: itself, or a float32 export of a litgpt checkpoint."""
    if (model_dir / LIT_CONFIG).is_file() and (model_dir / LIT_WEIGHTS).is_file():
        from vinasmol_core.model.export import export_hf

        return export_hf(model_dir, tmp / "hf", dtype="float32")
    if (model_dir / "config.json").is_file():
        return model_dir
    raise VinaSmolError(f"{model_dir} is neither an HF folder (config.json) nor a litgpt folder "
                        f"({LIT_CONFIG} + {LIT_WEIGHTS})")


def task_manager(tasks: list[str], include_path: Path | list[Path] | None = None) -> Any:
    """A TaskManager that knows every name of `tasks` (built-in tasks indexed only when needed);
    VinaSmolError naming the unknown ones."""
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise VinaSmolError("no harness task named (give --tasks, or eval.harness.tasks)")
    paths = [] if include_path is None else [include_path] if isinstance(include_path, Path) else include_path
    for path in paths:
        if not Path(path).is_dir():
            raise VinaSmolError(f"harness include path {path} is not a folder")
    local = [str(p) for p in paths] or None
    manager = None
    if local:
        manager = TaskManager(include_path=local, include_defaults=False)
        if not set(tasks) <= set(manager.all_tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=local)
    unknown = [t for t in tasks if t not in set(manager.all_tasks)]
    if unknown:
        where = f" nor in {', '.join(local)}" if local else ""
        raise VinaSmolError(f"unknown harness task(s): {', '.join(unknown)} (not in lm-evaluation-harness's "
                            f"task registry{where})")
    return manager


def _scores(results: dict[str, Any], tasks: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for task in tasks:
        row = results["results"].get(task, {})
        scores = {m: float(row[f"{m},none"]) for m in METRICS if f"{m},none" in row}
        n = results.get("n-samples", {}).get(task, {})
        if n:
            scores["n"] = float(n.get("effective", 0))
        out[task] = scores
    return out


# What torchrun, SLURM, MPI or a Lightning strategy leave in the environment; accelerate (inside the
# harness's HFLM) takes any of them for a distributed launch and calls init_process_group.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
                "MASTER_ADDR", "MASTER_PORT", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@contextlib.contextmanager
def single_process_environment() -> Iterator[None]:
    """The harness always evaluates in this one process: hide a launcher's variables meanwhile."""
    hidden = {k: v for k, v in os.environ.items() if k in LAUNCHER_ENV or k.startswith("TORCHELASTIC_")}
    for key in hidden:
        del os.environ[key]
    try:
        yield
    finally:
        os.environ.update(hidden)


def run_harness(
    model_dir: Path,
    tasks: list[str],
    *,
    limit: int | None = None,
    num_fewshot: int | None = None,
    include_path: Path | list[Path] | None = None,
    device: str = "cpu",
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """{task: {"acc", "acc_norm", ..., "n"}} of an HF or litgpt folder on harness tasks."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(tasks, include_path)
    with tempfile.TemporaryDirectory(prefix="vinasmol-harness-") as tmp:
        hf_dir = _hf_folder(Path(model_dir), Path(tmp))
        # Training documents follow <|endoftext|> (shards.py); the harness encodes a context with no
        # prefix unless told, so each context gets the tokenizer's BOS (that same token) first.
        tok_config = hf_dir / "tokenizer_config.json"
        config = hf_io.read_json(tok_config) if tok_config.is_file() else {}
        with single_process_environment():
            lm = HFLM(pretrained=str(hf_dir), tokenizer=str(hf_dir), device=device, dtype="float32",
                      batch_size=batch_size, add_bos_token=bool(config.get("bos_token")) or None)
            results = lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                log_samples=False, bootstrap_iters=0,
            )
    if results is None:
        raise VinaSmolError("lm-evaluation-harness returned no results")
    return _scores(results, list(tasks))
