"""Write folders in the hub's repository layout (a hub mirror): a dataset as parquet shards per
config and split with the `configs:` YAML front matter in README.md, read back by the same
`datasets.load_dataset(folder, config, split=..., streaming=True)` call as the hub; and a mirror of
all of a recipe's hub sources made of local documents (tests, offline benchmarks)."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from vinasmol_core.hub import mirror_configs, mirror_dir
from vinasmol_core.plan.recipe import CorpusSpec, HubSource, Recipe


def write_dataset_config(folder: Path, config: str | None, splits: Mapping[str, Iterable[dict[str, Any]]],
                         note: str = "", shard_rows: int = 4096) -> list[Path]:
    """Write `splits` (split name -> rows) of one config as parquet shards under `folder/<config>/`
    and declare the config in `folder/README.md` (configs already declared there are kept). All
    configs of a dataset must share one format (parquet here), as `datasets` infers one builder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = config or "default"
    sub = folder / name
    if sub.exists():
        shutil.rmtree(sub)
    sub.mkdir(parents=True)
    written: list[Path] = []
    for split, rows in splits.items():
        batch: list[dict[str, Any]] = []
        shards: list[list[dict[str, Any]]] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= shard_rows:
                shards.append(batch)
                batch = []
        if batch or not shards:
            shards.append(batch)
        for i, part in enumerate(shards):
            path = sub / f"{split}-{i:05d}-of-{len(shards):05d}.parquet"
            pq.write_table(pa.Table.from_pylist(part), path, row_group_size=512)
            written.append(path)
    configs = mirror_configs(folder)
    configs[name] = list(splits)
    _write_readme(folder, configs, note)
    return written


def _write_readme(folder: Path, configs: dict[str, list[str]], note: str) -> None:
    entries = [
        {"config_name": name, "data_files": [{"split": s, "path": f"{name}/{s}-*.parquet"} for s in splits]}
        for name, splits in sorted(configs.items())
    ]
    front = yaml.safe_dump({"configs": entries}, sort_keys=False, allow_unicode=True)
    body = f"# {folder.parent.name}/{folder.name} (local mirror)\n\n{note}\n" if note else ""
    (folder / "README.md").write_text(f"---\n{front}---\n{body}", encoding="utf-8")


def _share_of(doc_id: str) -> float:
    h = hashlib.blake2b(doc_id.encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def build_recipe_mirror(recipe: Recipe, out: Path, docs: Mapping[str, Sequence[dict[str, Any]]],
                        val_docs: Mapping[str, Sequence[dict[str, Any]]], model_dir: Path | None = None,
                        model_repos: Sequence[str] = ()) -> list[str]:
    """A hub mirror of the recipe's hub sources made of local documents (`{"id", "text"}` rows per
    language): each language's documents are dealt to its hub corpora by a stable hash of the id,
    in proportion to their budgets, so no two corpora share a document; a corpus's `val_split` gets
    the language's `val_docs`. The model folder `model_dir`, if given, is copied under each of
    `model_repos`. Returns one line per folder written."""
    lines: list[str] = []
    hub = [c for c in recipe.corpora if isinstance(c.source, HubSource)]
    for lang in sorted({c.lang for c in hub}):
        members = [c for c in hub if c.lang == lang]
        weights = [_weight(c) for c in members]
        bounds = [sum(weights[: i + 1]) / sum(weights) for i in range(len(members))]
        dealt: list[list[dict[str, Any]]] = [[] for _ in members]
        for doc in docs.get(lang, []):
            share = _share_of(str(doc["id"]))
            dealt[next(i for i, b in enumerate(bounds) if share < b or i == len(bounds) - 1)].append(doc)
        for corpus, rows in zip(members, dealt, strict=True):
            source = corpus.source
            assert isinstance(source, HubSource)
            splits = {source.split: [_row(corpus, d) for d in rows]}
            if source.val_split:
                splits[source.val_split] = [_row(corpus, d) for d in val_docs.get(lang, [])]
            folder = mirror_dir(out, source.dataset)
            note = (f"Local stand-in for the hub dataset {source.dataset}: NOT its data. Documents of the "
                    f"local {lang} corpus, dealt among the recipe's {lang} sources.")
            write_dataset_config(folder, source.config, splits, note)
            sizes = ", ".join(f"{s} {len(r)} docs" for s, r in splits.items())
            lines.append(f"{folder} config {source.config or 'default'}: {sizes} (corpus {corpus.name})")
    for repo in model_repos:
        if model_dir is None:
            break
        folder = mirror_dir(out, repo)
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(model_dir, folder)
        lines.append(f"{folder}: model copied from {model_dir}")
    return lines


def _weight(corpus: CorpusSpec) -> float:
    source = corpus.source
    assert isinstance(source, HubSource)
    return float(source.budget.planned_tokens(corpus.lang) or source.budget.documents or 1)


def _row(corpus: CorpusSpec, doc: dict[str, Any]) -> dict[str, Any]:
    """A mirror row in the corpus's layout: its text field, or for a conversation corpus the
    document's text as the answer to a short question (the columns its `document` reads)."""
    from vinasmol_core.data.documents import MessagesDocument

    source = corpus.source
    assert isinstance(source, HubSource)
    row: dict[str, Any] = {(source.id_field or "id"): str(doc["id"])}
    fmt = corpus.document
    if fmt is None:
        row[corpus.text_field] = doc["text"]
    elif isinstance(fmt, MessagesDocument):
        roles = list(fmt.labels)
        asker = "user" if "user" in roles else roles[0]
        answerer = "assistant" if "assistant" in roles else roles[-1]
        turns = ((asker, f"Question {doc['id']}?"), (answerer, doc["text"]))
        row[fmt.field] = [{fmt.role_key: role, fmt.content_key: text} for role, text in turns]
    else:
        row.update({fmt.prompt: f"Question {doc['id']}?", fmt.response: doc["text"]})
        row.update({c: "" for c in (fmt.context, fmt.system) if c})
    return row
