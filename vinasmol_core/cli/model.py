"""`vinasmol model ...`, `vinasmol export` and `vinasmol eval ...` commands."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from vinasmol_core.cli.options import path_pairs
from vinasmol_core.common.errors import ConfigError, VinaSmolError

app = typer.Typer(no_args_is_help=True, help="model surgery: fetch a base, extend its vocabulary, convert")
eval_app = typer.Typer(no_args_is_help=True, help="evaluate models")

StoreOpt = Annotated[
    str | None, typer.Option("--store", help="artifact store URL (file://, s3://, memory://)")
]
RefOpt = Annotated[str | None, typer.Option("--ref", help="store ref to point at the published artifact")]


def _store(url: str | None):  # noqa: ANN202 - ArtifactStore, imported lazily
    from vinasmol_core.store import ArtifactStore

    return ArtifactStore(url)


@app.command("fetch")
def fetch_command(
    source: Annotated[str, typer.Argument(help="HF folder or hub id (org/name)")],
    out: Annotated[Path | None, typer.Option("--out", help="where to put the model folder")] = None,
    store: StoreOpt = None,
    ref: RefOpt = None,
) -> None:
    """Get the base model (a folder, or the hub when online) and optionally publish it (format hf)."""
    from vinasmol_core.model import fetch_base_model, publish_checkpoint

    path = fetch_base_model(source, out)
    typer.echo(f"base model: {path}")
    if store:
        manifest = publish_checkpoint(_store(store), path, "hf", ref=ref, name=str(source), stage="base")
        typer.echo(f"published {manifest.digest}" + (f" as {ref}" if ref else ""))


@app.command("extend")
def extend_command(
    base: Annotated[str, typer.Option("--base", help="base HF folder or hub id")],
    tokenizer: Annotated[Path, typer.Option("--tokenizer", help="extended tokenizer folder")],
    out: Annotated[Path, typer.Option("--out", help="output HF folder")],
    init: Annotated[
        str, typer.Option("--init", help="subword-mean | translation-blend | distill")
    ] = "subword-mean",
    translations: Annotated[
        str | None, typer.Option("--translations", help="TSV dictionary, or a seq2seq model folder / hub id")
    ] = None,
    blend: Annotated[float, typer.Option("--blend", help="weight of the translation's embedding")] = 0.5,
    corpus: Annotated[
        list[Path] | None,
        typer.Option("--corpus", help="distill's training text (.jsonl[.gz], .txt); repeatable"),
    ] = None,
    distill_tokens: Annotated[
        int, typer.Option("--distill-tokens", help="distill budget: extended-tokenizer tokens read")
    ] = 16_384,
    distill_lr: Annotated[float, typer.Option("--distill-lr", help="distill learning rate (Adam)")] = 3e-3,
    seed: Annotated[int, typer.Option("--seed", help="distill seed (order of the text windows)")] = 0,
    store: StoreOpt = None,
    ref: RefOpt = None,
) -> None:
    """Resize the embeddings to the extended tokenizer and initialise the new rows."""
    from vinasmol_core.model import extend_model, fetch_base_model, publish_checkpoint
    from vinasmol_core.model.distill import DistillSettings

    if corpus and init != "distill":
        raise ConfigError("--corpus: only the distill init reads training text")
    settings = DistillSettings(tokens=distill_tokens, lr=distill_lr, seed=seed) if init == "distill" else None
    with tempfile.TemporaryDirectory(prefix="vinasmol-base-") as tmp:
        base_dir = fetch_base_model(base, None if Path(base).is_dir() else Path(tmp) / "base")
        path = extend_model(base_dir, tokenizer, out, init=init, translations=translations, blend=blend,
                            corpus=[([p], 1.0) for p in corpus or []], distill=settings, log=typer.echo)
    info = json.loads((path / "extension.json").read_text())
    d = info.get("distill") or {}
    typer.echo(
        f"extended {info['base_vocab_size']} -> {info['vocab_size']} tokens ({init}"
        + (f", {info['translated_tokens']} translated" if init == "translation-blend" else "")
        + (f", {d['tokens']} tokens in {d['seconds']:.0f} s, loss {d['loss_first']:.4f}"
           f" -> {d['loss_last']:.4f}" if d else "")
        + f"): {path}"
    )
    if store:
        manifest = publish_checkpoint(_store(store), path, "hf", ref=ref, name="extended", stage="extended")
        typer.echo(f"published {manifest.digest}" + (f" as {ref}" if ref else ""))


@app.command("to-litgpt")
def to_litgpt_command(
    hf_dir: Annotated[Path, typer.Argument(help="HF model folder")],
    out: Annotated[Path, typer.Option("--out", help="output litgpt folder")],
    litgpt_name: Annotated[
        str | None, typer.Option("--litgpt-name", help="litgpt config name (default: detected)")
    ] = None,
    pad_multiple: Annotated[int, typer.Option("--pad-multiple", help="pad embedding rows to a multiple")] = 1,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="check logits parity")] = True,
    store: StoreOpt = None,
    ref: RefOpt = None,
) -> None:
    """Convert an HF LLaMA folder to a litgpt checkpoint (lit_model.pth, model_config.yaml, tokenizer)."""
    from vinasmol_core.model import hf_to_litgpt, load_litgpt_config, publish_checkpoint

    path = hf_to_litgpt(hf_dir, out, litgpt_name, pad_multiple=pad_multiple, verify=verify)
    config = load_litgpt_config(path)
    sizes = f"vocab {config.vocab_size}, padded {config.padded_vocab_size}"
    typer.echo(f"litgpt checkpoint ({config.name}, {sizes}): {path}")
    if store:
        manifest = publish_checkpoint(_store(store), path, "litgpt", ref=ref, name=config.name, stage="init")
        typer.echo(f"published {manifest.digest}" + (f" as {ref}" if ref else ""))


def export_command(
    checkpoint: Annotated[str, typer.Argument(help="litgpt folder, or a checkpoint ref/digest with --store")],
    out: Annotated[Path, typer.Option("--out", help="output HF folder")],
    dtype: Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16")] = "bfloat16",
    card: Annotated[Path | None, typer.Option("--card", help="JSON file with the model card fields")] = None,
    store: StoreOpt = None,
    publish: Annotated[
        str | None, typer.Option("--publish", help="publish the export under this ref")
    ] = None,
) -> None:
    """Export a litgpt checkpoint as a Hugging Face folder, verified by logits parity."""
    from vinasmol_core.model import export_hf, publish_checkpoint, resolve_model_dir

    card_data = None
    if card is not None:
        try:
            card_data = json.loads(card.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--card: cannot read {card}: {exc}") from exc
    src = resolve_model_dir(checkpoint, store)
    path = export_hf(src, out, dtype=dtype, card=card_data)
    info = json.loads((path / "export.json").read_text())
    typer.echo(f"exported ({dtype}, parity max |Δlogit| {info['parity_max_abs_diff']:.2e}): {path}")
    if publish:
        if not store:
            raise ConfigError("--publish needs --store")
        manifest = publish_checkpoint(_store(store), path, "hf", ref=publish, name="export", stage="export")
        typer.echo(f"published {manifest.digest} as {publish}")


@eval_app.command("bpb")
def bpb_command(
    models: Annotated[list[str], typer.Argument(help="HF or litgpt folders (or refs with --store)")],
    data: Annotated[list[str], typer.Option("--data", help="LANG=FILE (.jsonl[.gz] or .txt); repeatable")],
    max_docs: Annotated[int | None, typer.Option("--max-docs", help="documents per language")] = None,
    max_bytes: Annotated[int | None, typer.Option("--max-bytes", help="UTF-8 bytes per language")] = None,
    max_doc_bytes: Annotated[
        int | None, typer.Option("--max-doc-bytes", help="first N UTF-8 bytes of each document")
    ] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="window length in tokens")] = 1024,
    device: Annotated[str, typer.Option("--device")] = "cpu",
    dtype: Annotated[str, typer.Option("--dtype")] = "float32",
    json_out: Annotated[Path | None, typer.Option("--json", help="write the scores as JSON")] = None,
    store: StoreOpt = None,
) -> None:
    """Bits per byte of each model on each language (tokenizer-independent)."""
    from rich.console import Console
    from rich.table import Table

    from vinasmol_core.model import bits_per_byte_report, resolve_model_dir
    from vinasmol_core.model.bpb import report_to_json

    files = path_pairs(data, "--data", "LANG=FILE")
    results = {}
    for spec in models:
        path = resolve_model_dir(spec, store)
        results[spec] = bits_per_byte_report(
            path,
            files,
            max_docs=max_docs,
            seq_len=seq_len,
            max_bytes=max_bytes,
            max_doc_bytes=max_doc_bytes,
            device=device,
            dtype=dtype,
        )
    table = Table(title="bits per byte (lower is better)")
    table.add_column("model")
    for lang in files:
        table.add_column(f"{lang} bpb", justify="right")
        table.add_column(f"{lang} bytes/token", justify="right")
    for spec, report in results.items():
        row = [spec]
        for lang in files:
            row += [f"{report[lang].bpb:.4f}", f"{report[lang].bytes_per_token:.2f}"]
        table.add_row(*row)
    Console().print(table)
    if json_out is not None:
        json_out.write_text(json.dumps({k: report_to_json(v) for k, v in results.items()}, indent=2) + "\n")


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{option}: expected comma-separated integers, got {text!r}") from None


@eval_app.command("long")
def long_command(
    checkpoint: Annotated[str, typer.Argument(help="HF or litgpt folder (or a ref/digest with --store)")],
    data: Annotated[
        list[str] | None, typer.Option("--data", help="LANG=FILE of long validation documents; repeatable")
    ] = None,
    length: Annotated[int, typer.Option("--length", help="tokens per long document")] = 8192,
    passkey_lengths: Annotated[str, typer.Option("--passkey-lengths", help="comma-separated")] = (
        "2048,4096,8192"
    ),
    depths: Annotated[str, typer.Option("--depths", help="needle depths in [0, 1], comma-separated")] = (
        "0,0.25,0.5,0.75,1"
    ),
    trials: Annotated[int, typer.Option("--trials", help="prompts per length and depth")] = 2,
    max_docs: Annotated[int, typer.Option("--max-docs", help="long documents per language")] = 8,
    device: Annotated[str, typer.Option("--device")] = "cpu",
    json_out: Annotated[Path | None, typer.Option("--json", help="write the report as JSON")] = None,
    store: StoreOpt = None,
) -> None:
    """Long-context checks: bits per byte by position bucket, and passkey retrieval by length and depth."""
    from vinasmol_core.model import resolve_model_dir
    from vinasmol_core.model.long_context import long_context_report

    try:
        depth_list = [float(x) for x in depths.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--depths: expected comma-separated numbers, got {depths!r}") from None
    if not depth_list or not all(0 <= d <= 1 for d in depth_list):
        raise ConfigError(f"--depths: each depth must lie in [0, 1], got {depths!r}")
    files = path_pairs(data, "--data", "LANG=FILE") if data else {}
    report = long_context_report(
        resolve_model_dir(checkpoint, store), files, length=length,
        passkey_lengths=_ints(passkey_lengths, "--passkey-lengths"), depths=depth_list, trials=trials,
        max_docs=max_docs, device=device,
    )
    from vinasmol_core.model.eval_tables import long_bpb_markdown, passkey_markdown

    if report["bpb"]:
        typer.echo(long_bpb_markdown({checkpoint: report}) + "\n")
    if report["passkey"]:
        typer.echo(passkey_markdown({checkpoint: report}))
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2) + "\n")


@eval_app.command("harness")
def harness_command(
    checkpoint: Annotated[str, typer.Argument(help="HF or litgpt folder (or a ref/digest with --store)")],
    tasks: Annotated[str, typer.Option("--tasks", help="comma-separated harness task names")],
    include_path: Annotated[
        Path | None, typer.Option("--include-path", help="folder of local task YAML files")
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="documents per task")] = None,
    num_fewshot: Annotated[int | None, typer.Option("--num-fewshot")] = None,
    device: Annotated[str, typer.Option("--device")] = "cpu",
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the scores as JSON")] = None,
    store: StoreOpt = None,
) -> None:
    """lm-evaluation-harness tasks on a checkpoint (a litgpt one is exported to HF on the way)."""
    from vinasmol_core.model import resolve_model_dir
    from vinasmol_core.model.eval_tables import harness_markdown
    from vinasmol_core.model.harness import run_harness

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    scores = run_harness(resolve_model_dir(checkpoint, store), names, limit=limit, num_fewshot=num_fewshot,
                         include_path=include_path, device=device, batch_size=batch_size)
    typer.echo(harness_markdown({checkpoint: scores}))
    if json_out is not None:
        json_out.write_text(json.dumps(scores, indent=2) + "\n")

__all__ = ["app", "eval_app", "export_command", "VinaSmolError"]
