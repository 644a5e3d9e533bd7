"""`vinasmol train ...` commands: run or check one training stage, print a stage preset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    no_args_is_help=True, help="Training stages (EEVE 3/4/6/7, CPT, context extension, annealing)."
)


def _print_event(event: dict[str, Any]) -> None:
    kind = event.get("event")
    if kind == "step":
        print(
            f"[{event['stage']}] step {event['step']}/{event['total_steps']} loss {event['loss']:.4f} "
            f"lr {event['lr']:.2e} grad-norm {event['grad_norm']:.3f} {event['tokens_per_s']:.0f} tok/s",
            flush=True,
        )
    elif kind == "eval":
        parts = [
            f"{lang} loss {event['val_loss'][lang]:.4f} bpb {event['val_bpb'][lang]:.4f}"
            for lang in sorted(event.get("val_loss", {}))
        ]
        print(f"[{event['stage']}] eval @ step {event['step']}: " + ", ".join(parts), flush=True)
    elif kind == "start":
        resumed = f", resumed from step {event['resumed_from']}" if event.get("resumed_from") else ""
        print(
            f"[{event['stage']}] {event['total_steps']} steps, {event['trainable_params']:,} trainable "
            f"parameters ({event.get('optimizer_state_bytes', 0) / 2**20:.1f} MiB of AdamW state"
            f"{', ReLoRA' if event.get('relora') else ''}), {event['world_size']} process(es){resumed}",
            flush=True,
        )
    elif kind == "merge":
        print(f"[{event['stage']}] ReLoRA merge after step {event['step']}", flush=True)
    elif kind == "checkpoint":
        print(f"[{event['stage']}] train-state at step {event['step']} -> {event['ref']}", flush=True)


@app.command("run")
def run(
    job: Annotated[Path, typer.Option("--job", help="StageJob JSON file")],
    metrics: Annotated[Path | None, typer.Option("--metrics", help="also append metrics JSONL here")] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", help="only progress lines, not the stage's own output")
    ] = False,
) -> None:
    """Run one stage in its own process (torchrun for several devices); resume from the store."""
    from vinasmol_core.train.process import run_stage_process
    from vinasmol_core.train.spec import load_job

    stage_job = load_job(job)
    manifest = run_stage_process(stage_job, _print_event, metrics_path=metrics, echo=not quiet)
    print(
        json.dumps(
            {
                "digest": manifest.digest,
                "stage": manifest.stage,
                "step": manifest.step,
                "metrics": manifest.metrics,
            },
            indent=2,
        )
    )


@app.command("check")
def check(job: Annotated[Path, typer.Option("--job", help="StageJob JSON file")]) -> None:
    """Every check a stage makes before training (spec, inputs, tokenizer, patterns), nothing else."""
    from vinasmol_core.train.inputs import validate_job
    from vinasmol_core.train.spec import load_job

    stage_job = load_job(job)
    inputs = validate_job(stage_job)
    spec = stage_job.spec
    print(
        f"ok: stage {spec.name}: {spec.total_steps} steps of {spec.tokens_per_step:,} tokens, "
        f"grad accumulation {spec.grad_accum}, model block_size {inputs.config.block_size}, "
        f"validation on {', '.join(inputs.languages) or 'nothing'}"
    )


@app.command("preset")
def preset_cmd(
    kind: Annotated[
        str, typer.Argument(help="eeve-3, eeve-4, eeve-6, eeve-7, cpt, context-extension, annealing")
    ],
    set_: Annotated[list[str] | None, typer.Option("--set", help="FIELD=JSON_VALUE override")] = None,
) -> None:
    """Print the recipe's default StageSpec for a stage kind, as JSON."""
    from vinasmol_core.cli.options import split_pair
    from vinasmol_core.train.spec import preset

    overrides: dict[str, Any] = {}
    for item in set_ or []:
        key, value = split_pair(item, "--set", "FIELD=VALUE", empty_value=True)
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
    print(preset(kind, **overrides).model_dump_json(indent=2))
