"""`vinasmol data ...` commands: prepare a dataset artifact, inspect one, look at sampled sequences."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from vinasmol_core.cli.options import split_pair
from vinasmol_core.common.errors import ConfigError

app = typer.Typer(no_args_is_help=True, help="Training data: prepare token shards, inspect them, sample.")


def _merge_sources(texts: list[str], text_field: str, id_field: str | None) -> list:
    """Parse --source values; repeating a NAME:LANG[:ROLE] adds paths to that source."""
    from vinasmol_core.data import SourceSpec

    merged: dict[str, SourceSpec] = {}
    for text in texts:
        spec = SourceSpec.parse_cli(text, text_field=text_field, id_field=id_field)
        prev = merged.get(spec.name)
        if prev is None:
            merged[spec.name] = spec
        elif (prev.lang, prev.role) != (spec.lang, spec.role) or prev.hf_dataset or spec.hf_dataset:
            raise ConfigError(f"--source {spec.name!r} is given twice with different settings")
        else:
            merged[spec.name] = prev.model_copy(update={"paths": prev.paths + spec.paths})
    return list(merged.values())


def _parse_weights(text: str) -> dict[str, float]:
    weights: dict[str, float] = {}
    for part in text.split(","):
        key, value = split_pair(part, "--weights", "KEY=WEIGHT[,KEY=WEIGHT...]", empty_value=True)
        try:
            weights[key.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--weights: weight for {key!r} is not a number: {value!r}") from None
    return weights


@app.command()
def prepare(
    source: list[str] = typer.Option(
        ..., "--source", "-s",
        help="NAME:LANG[:ROLE]=PATH_OR_GLOB[,PATH...] (LANG vi|en|code|any, ROLE main|annealing; "
             "hf:DATASET[:CONFIG]@SPLIT for a hub dataset). Repeat for more sources."),
    tokenizer: Path = typer.Option(..., "--tokenizer", help="tokenizer folder (tokenizer.json)"),
    out: Path = typer.Option(..., "--out", help="dataset folder to write"),
    store: str | None = typer.Option(None, "--store", help="artifact store URL to publish to"),
    ref: str | None = typer.Option(None, "--ref", help="store ref to point at the dataset"),
    val_fraction: float = typer.Option(0.01, "--val-fraction"),
    dedup: bool = typer.Option(True, "--dedup/--no-dedup", help="exact deduplication across sources"),
    near_dedup: bool = typer.Option(False, "--near-dedup", help="MinHash LSH near-duplicate removal"),
    near_dedup_threshold: float = typer.Option(0.8, "--near-dedup-threshold"),
    skip_bad_lines: bool = typer.Option(False, "--skip-bad-lines",
                                        help="skip (and count) lines that are not UTF-8 JSON objects"),
    text_field: str = typer.Option("text", "--text-field"),
    id_field: str = typer.Option("id", "--id-field", help="record field naming a document ('' for none)"),
    min_chars: int = typer.Option(32, "--min-chars"),
    curate: bool = typer.Option(False, "--curate/--no-curate",
                                help="curation before dedup (encoding, quality filters, PII)"),
    curation: Path | None = typer.Option(None, "--curation",
                                         help="YAML file of curation settings (the recipe's data.curation; "
                                              "implies --curate)"),
    workers: int | None = typer.Option(None, "--workers", help="worker processes (default: one per core)"),
) -> None:
    """Clean, deduplicate, split, tokenize and pack sources into a dataset folder."""
    from vinasmol_core.data import CleaningSpec, PrepareSettings, SourceStats, prepare_dataset

    sources = _merge_sources(source, text_field, id_field or None)

    def done(name: str, s: SourceStats) -> None:
        typer.echo(f"  {name}: {s.docs_read:,} docs read, {sum(s.removed.values()):,} removed, "
                   f"{s.exact_duplicates + s.near_duplicates:,} duplicates, "
                   f"{s.train_tokens:,} train / {s.val_tokens:,} val tokens")

    def progress(name: str, s: SourceStats) -> None:
        typer.echo(f"  {name}: {s.bytes_read / 1e6:,.1f} MB, {s.docs_read:,} docs so far", err=True)

    settings = PrepareSettings(cleaning=CleaningSpec(min_chars=min_chars), val_fraction=val_fraction,
                               curation=_curation_spec(curation) if curation or curate else None,
                               dedup=dedup, near_dedup=near_dedup, near_dedup_threshold=near_dedup_threshold,
                               skip_bad_lines=skip_bad_lines, workers=workers)
    info = prepare_dataset(sources, tokenizer, out, settings, store=store, ref=ref, on_source_done=done,
                           on_progress=progress)
    where = str(info.dir) if info.dir else f"store {store}"
    verb = "reused" if info.reused else f"built in {info.seconds:.1f} s"
    typer.echo(f"dataset {info.key[:12]} {verb}: {where}")
    counts = ", ".join(f"{k}={v:,}" for k, v in info.token_counts.items())
    typer.echo(f"tokens: {counts}")
    if info.manifest_digest:
        typer.echo(f"published: {info.manifest_digest}")


def _curation_spec(path: Path | None) -> Any:
    """The CurationSpec of a YAML file (defaults without one); ConfigError naming the file and field."""
    import yaml
    from pydantic import ValidationError

    from vinasmol_core.data import CurationSpec

    if path is None:
        return CurationSpec()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--curation {path}: cannot read it ({exc})") from None
    try:
        return CurationSpec.model_validate(data)
    except ValidationError as exc:
        from vinasmol_core.plan.recipe import format_validation_error

        raise ConfigError(format_validation_error(exc, f"--curation {path}").replace("invalid recipe ", "")
                          ) from None


@app.command()
def inspect(
    dataset_dir: Path = typer.Argument(..., help="a prepared dataset folder"),
    as_json: bool = typer.Option(False, "--json", help="print dataset.json's summary as JSON"),
) -> None:
    """Sources, cleaning counts, documents and tokens per split of a prepared dataset."""
    from vinasmol_core.data import load_dataset_meta

    meta = load_dataset_meta(dataset_dir)
    if as_json:
        summary = {k: meta[k] for k in ("key", "tokenizer_digest", "vocab_size", "dtype", "token_counts")}
        summary["sources"] = {s["name"]: {"lang": s["lang"], "role": s["role"], **s["stats"]}
                              for s in meta["sources"]}
        typer.echo(json.dumps(summary, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 160))  # the table is wide; do not squeeze it
    console.print(f"dataset [bold]{meta['key'][:12]}[/bold]  "
                  f"tokenizer sha256 {meta['tokenizer_digest'][:12]}  "
                  f"vocab {meta['vocab_size']:,} ({meta['dtype']})  val fraction {meta['val_fraction']}  "
                  f"dedup {meta['dedup']}  near-dedup {meta['near_dedup']}")
    table = Table("source", "lang", "role", "read", "removed", "dups", "bad lines", "train docs",
                  "train tokens", "val docs", "val tokens", "shards")
    for s in meta["sources"]:
        st = s["stats"]
        removed = ", ".join(f"{k} {v}" for k, v in st["removed"].items() if v) or "0"
        shards = sum(len(s["splits"][sp]["shards"]) for sp in ("train", "val"))
        table.add_row(s["name"], s["lang"], s["role"], f"{st['docs_read']:,}", removed,
                      f"{st['exact_duplicates'] + st['near_duplicates']:,}", f"{st['bad_lines_skipped']:,}",
                      f"{st['train_docs']:,}", f"{st['train_tokens']:,}", f"{st['val_docs']:,}",
                      f"{st['val_tokens']:,}", str(shards))
    console.print(table)
    _print_filters(console, meta)
    totals = Table("tokens", *meta["token_counts"].keys())
    totals.add_row("", *(f"{v:,}" for v in meta["token_counts"].values()))
    console.print(totals)


def _print_filters(console: Any, meta: dict[str, Any]) -> None:
    """What each filter removed and edited, per source, with its first examples."""
    from rich.table import Table

    from vinasmol_core.data import SourceStats
    from vinasmol_core.data.curate import filter_table

    rows = filter_table((s["name"], s["lang"], SourceStats(**s["stats"])) for s in meta["sources"])
    if not rows:
        return
    cur = meta.get("curation")
    console.print(f"filters (curation {'on' if cur and cur.get('enabled') else 'off'})")
    table = Table("source", "filter", "docs removed", "MB removed", "docs edited", "MB cut", "examples")
    for r in rows:
        table.add_row(r["source"], r["filter"], f"{r['docs removed']:,}", f"{r['MB removed']:.3f}",
                      f"{r['docs edited']:,}", f"{r['MB cut']:.3f}", r["examples"].replace(" | ", "\n"))
    console.print(table)


@app.command()
def sample(
    dataset_dir: Path = typer.Argument(..., help="a prepared dataset folder"),
    weights: str = typer.Option("vi=0.55,en=0.40,code=0.05", "--weights", help="KEY=WEIGHT,..."),
    seq_len: int = typer.Option(2048, "--seq-len"),
    seed: int = typer.Option(0, "--seed"),
    stage: str = typer.Option("", "--stage"),
    index: int = typer.Option(0, "--index", help="first global sequence index"),
    count: int = typer.Option(3, "--count"),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="decode with this tokenizer folder"),
) -> None:
    """Print where sampled sequences come from (and their text, with --tokenizer)."""
    from vinasmol_core.data import MixtureSampler

    sampler = MixtureSampler(dataset_dir, _parse_weights(weights), seq_len, seed=seed, stage=stage,
                             tokenizer_dir=tokenizer)
    decode = None
    if tokenizer is not None:
        from tokenizers import Tokenizer

        from vinasmol_core.data.tokcheck import tokenizer_file

        decode = Tokenizer.from_file(str(tokenizer_file(tokenizer))).decode
    for i in range(index, index + count):
        name, offset, epoch = sampler.locate(i)
        typer.echo(f"[{i}] {name} @ token {offset:,} (pass {epoch})")
        if decode is not None:
            typer.echo(decode(sampler.sequence(i).tolist(), skip_special_tokens=False)[:400])
