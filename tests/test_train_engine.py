"""Training stages end to end on a tiny SmolLM2-shaped model, a file:// store and the sample corpora:
SIGKILL and resume, DDP against one process, the EEVE chain, and refusal of bad inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.model_fixtures import tiny_stage_inputs
from vinasmol_core.common.errors import ConfigError, VinaSmolError
from vinasmol_core.train import params
from vinasmol_core.train.metrics import read_events
from vinasmol_core.train.spec import StageJob, StageSpec

pytestmark = pytest.mark.timeout(600)

MIXTURE = {"vi": 0.6, "en": 0.3, "code": 0.1}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from tiny_stage_inputs(tmp_path_factory, "train")


def store_of(env):
    from vinasmol_core.store import ArtifactStore

    return ArtifactStore(env.store_url)


def stage_spec(name: str, trainable, **kw) -> StageSpec:
    data = dict(
        name=name,
        trainable=trainable,
        lr=5e-3,
        min_lr=1e-4,
        warmup_steps=1,
        max_tokens=6 * 4 * 32,
        seq_len=32,
        global_batch=4,
        micro_batch=2,
        precision="32-true",
        accelerator="cpu",
        mixture=MIXTURE,
        checkpoint_interval=2,
        eval_interval=3,
        eval_sequences=4,
        cpu_threads=1,
    )
    data.update(kw)
    return StageSpec(**data)


def make_job(env, spec: StageSpec, tag: str, init: str | None = None) -> StageJob:
    return StageJob(
        spec=spec,
        init_checkpoint=init or env.init_ref,
        dataset=env.dataset_ref,
        store_url=env.store_url,
        out_ref=f"test/{tag}/{spec.name}",
        partial_ref_prefix=f"test-partial/{tag}/{spec.name}",
    )


def weights(env, ref: str) -> dict[str, torch.Tensor]:
    return torch.load(Path(store_of(env).fetch(ref)) / "lit_model.pth", weights_only=True)


def events_of(env, ref: str) -> list[dict]:
    return read_events(Path(store_of(env).fetch(ref)) / "metrics.jsonl")


def step_losses(events: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events if e["event"] == "step"}


@pytest.fixture(scope="module")
def reference(env):
    """Stage 3 run uninterrupted in one process."""
    from vinasmol_core.train.engine import run_stage

    job = make_job(env, stage_spec("eeve-3", "new-embeddings"), "reference")
    return run_stage(job)


def test_sigkill_then_resume_is_bit_identical(env, reference, stage_processes) -> None:
    from vinasmol_core.train.process import run_stage_process

    job = make_job(env, stage_spec("eeve-3", "new-embeddings"), "killed")
    job.fail_at_step = 5
    seen: list[dict] = []
    with pytest.raises(VinaSmolError, match="killed by signal 9"):
        run_stage_process(job, seen.append, echo=False)
    assert [e["step"] for e in seen if e["event"] == "checkpoint"] == [2, 4]
    assert max(e["step"] for e in seen if e["event"] == "step") == 5
    store = store_of(env)
    assert sorted(store.list_refs("test-partial/killed/")) == [
        "test-partial/killed/eeve-3/step-00000002",
        "test-partial/killed/eeve-3/step-00000004",
    ]
    assert not store.exists("test/killed/eeve-3")

    job.fail_at_step = None
    seen2: list[dict] = []
    manifest = run_stage_process(job, seen2.append, echo=False)
    assert seen2[0]["event"] == "start" and seen2[0]["resumed_from"] == 4
    assert [e["step"] for e in seen2 if e["event"] == "step"] == [5, 6]
    assert manifest.extra["resumed_from_step"] == 4

    ref, got = weights(env, reference.digest), weights(env, manifest.digest)
    assert sorted(ref) == sorted(got)
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    assert step_losses(events_of(env, manifest.digest)) == step_losses(events_of(env, reference.digest))


def test_sigterm_publishes_the_step_in_progress_then_resume_is_bit_identical(
    env, reference, stage_processes
) -> None:
    """A SIGTERM to the process that runs the stage (a pod's main process, being evicted) reaches the
    stage process, which finishes its step, publishes a train-state of it and stops; a re-run resumes
    from that step and ends bit-identical to the uninterrupted run."""
    import os
    import re
    import signal

    from vinasmol_core.train.process import run_stage_process

    job = make_job(env, stage_spec("eeve-3", "new-embeddings"), "sigterm")
    seen: list[dict] = []

    def on_metrics(event: dict) -> None:
        seen.append(event)
        if event["event"] == "step" and event["step"] == 3:  # step 3 has no train-state of its own
            os.kill(os.getpid(), signal.SIGTERM)  # forwarded to the stage's session by run_processes

    with pytest.raises(VinaSmolError, match=r"stopped by SIGTERM after step \d of 6") as err:
        run_stage_process(job, on_metrics, echo=False)
    stopped = int(re.search(r"after step (\d)", str(err.value)).group(1))
    assert 3 <= stopped < 6
    assert [e["step"] for e in seen if e["event"] == "preempted"] == [stopped]
    assert max(e["step"] for e in seen if e["event"] == "step") == stopped
    store = store_of(env)
    newest = sorted(store.list_refs("test-partial/sigterm/"))[-1]
    assert newest == f"test-partial/sigterm/eeve-3/step-{stopped:08d}"
    assert not store.exists("test/sigterm/eeve-3")

    seen2: list[dict] = []
    manifest = run_stage_process(job, seen2.append, echo=False)
    assert seen2[0]["event"] == "start" and seen2[0]["resumed_from"] == stopped
    ref, got = weights(env, reference.digest), weights(env, manifest.digest)
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    assert step_losses(events_of(env, manifest.digest)) == step_losses(events_of(env, reference.digest))


def test_ddp_two_processes_match_one(env, reference) -> None:
    from vinasmol_core.train.process import run_stage_process

    job = make_job(env, stage_spec("eeve-3", "new-embeddings", devices=2), "ddp")
    manifest = run_stage_process(job, echo=False)
    one, two = events_of(env, reference.digest), events_of(env, manifest.digest)
    assert [e for e in two if e["event"] == "start"][0]["world_size"] == 2
    l1, l2 = step_losses(one), step_losses(two)
    assert list(l1) == list(l2) == [1, 2, 3, 4, 5, 6]
    for step in l1:
        assert abs(l1[step] - l2[step]) < 1e-5, (step, l1[step], l2[step])
    v1 = [e["val_loss"] for e in one if e["event"] == "eval"]
    v2 = [e["val_loss"] for e in two if e["event"] == "eval"]
    assert len(v1) == len(v2) == 3 and v1[0].keys() == v2[0].keys() and {"vi", "en"} <= v1[0].keys()
    for a, b in zip(v1, v2, strict=True):
        for lang in a:
            assert abs(a[lang] - b[lang]) < 1e-5
    w1, w2 = weights(env, reference.digest), weights(env, manifest.digest)
    base = env.base_vocab_size
    assert torch.equal(w2[params.EMBED][:base], w1[params.EMBED][:base])
    assert torch.allclose(w2[params.EMBED], w1[params.EMBED], atol=1e-5)


@pytest.mark.timeout(300)
def test_ddp_evaluation_with_fewer_windows_than_ranks(env) -> None:
    """One validation sequence per language on two ranks: rank 1 has none of its own. Both ranks must
    make the same forward passes (DDP broadcasts buffers in every forward), or the run hangs."""
    from vinasmol_core.train.engine import run_stage
    from vinasmol_core.train.process import run_stage_process

    kw = dict(eval_sequences=1, max_tokens=2 * 4 * 32, checkpoint_interval=2, eval_interval=1)
    one = run_stage(make_job(env, stage_spec("eeve-3", "new-embeddings", **kw), "eval-one"))
    two = run_stage_process(
        make_job(env, stage_spec("eeve-3", "new-embeddings", devices=2, **kw), "eval-ddp"), echo=False
    )
    v1 = [e["val_loss"] for e in events_of(env, one.digest) if e["event"] == "eval"]
    v2 = [e["val_loss"] for e in events_of(env, two.digest) if e["event"] == "eval"]
    assert len(v1) == len(v2) == 3 and {"vi", "en"} <= v1[0].keys()
    for a, b in zip(v1, v2, strict=True):
        assert a.keys() == b.keys()
        for lang in a:
            assert abs(a[lang] - b[lang]) < 1e-5, (lang, a[lang], b[lang])


def test_a_tiny_mixture_weight_still_draws_and_is_reported(env) -> None:
    """0.0001 of 4,096 slots rounds to none: the source still gets one slot per block, and the stage's
    start event and manifest show the effective share next to the requested one, with a warning."""
    from vinasmol_core.train.engine import run_stage

    spec = stage_spec("eeve-3", "new-embeddings", mixture={"vi": 0.9999, "en": 0.0001}, max_tokens=4 * 32,
                      eval_sequences=0)
    manifest = run_stage(make_job(env, spec, "tiny-weight"))
    en = manifest.extra["mixture"]["sample-en"]
    assert en["effective"] == 1 / 4096 and abs(en["requested"] - 0.0001) < 1e-12
    [warning] = manifest.extra["mixture_warnings"]
    assert "sample-en" in warning
    [start] = [e for e in events_of(env, manifest.digest) if e["event"] == "start"]
    assert start["mixture"] == manifest.extra["mixture"] and start["warnings"] == [warning]


def _check_litgpt_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """The folder is a plain litgpt checkpoint: strict load into GPT, one tied tensor, files present."""
    from litgpt import Config
    from litgpt.model import GPT

    for name in (
        "lit_model.pth",
        "model_config.yaml",
        "tokenizer.json",
        "tokenizer_config.json",
        "metrics.jsonl",
        "loss_curve.svg",
    ):
        assert (folder / name).is_file(), name
    sd = torch.load(folder / "lit_model.pth", weights_only=True)
    assert sd[params.HEAD].untyped_storage().data_ptr() == sd[params.EMBED].untyped_storage().data_ptr()
    GPT(Config.from_file(folder / "model_config.yaml")).load_state_dict(sd, strict=True)
    return sd


def test_eeve_chain_to_annealing(env) -> None:
    from vinasmol_core.train.engine import run_stage

    plan = [
        ("eeve-3", "new-embeddings", {}),
        ("eeve-4", "embeddings", {}),
        ("eeve-6", "all", {}),
        ("eeve-7", "transformer", {}),
        (
            "context-extension",
            "all",
            dict(
                seq_len=128,
                block_size=128,
                rope_base=40000.0,
                global_batch=2,
                micro_batch=1,
                max_tokens=4 * 2 * 128,
                long_context={"factor": 4.0},
                eval_sequences=2,
            ),
        ),
        (
            "annealing",
            "all",
            dict(
                schedule="linear", min_lr=0.0, mixture={"vi": 0.3, "en": 0.25, "code": 0.05, "annealing": 0.4}
            ),
        ),
    ]
    store = store_of(env)
    init = env.init_ref
    outputs = []
    for name, policy, kw in plan:
        manifest = run_stage(make_job(env, stage_spec(name, policy, **kw), "chain", init=init))
        assert manifest.format == "litgpt" and manifest.stage == name
        outputs.append(manifest)
        init = f"test/chain/{name}"  # the next stage starts from this one's published ref

    sds = [weights(env, env.init_ref)] + [
        _check_litgpt_checkpoint(Path(store.fetch(m.digest))) for m in outputs
    ]
    base = env.base_vocab_size

    def changed(a: dict, b: dict) -> set[str]:
        return {k for k in a if k != params.HEAD and not torch.equal(a[k], b[k])}

    init_sd, s3, s4, s6, s7, ctx, ann = sds
    assert changed(init_sd, s3) == {params.EMBED}
    assert torch.equal(s3[params.EMBED][:base], init_sd[params.EMBED][:base])
    assert not torch.equal(s3[params.EMBED][base:], init_sd[params.EMBED][base:])
    assert changed(s3, s4) == {params.EMBED}
    assert torch.equal(s4[params.EMBED][0], s4[params.HEAD][0])
    assert changed(s4, s6) == set(k for k in s4 if k != params.HEAD)
    assert params.EMBED not in changed(s6, s7) and "transformer.ln_f.weight" not in changed(s6, s7)
    assert changed(s6, s7) == {k for k in s6 if k.startswith("transformer.h.")}
    assert changed(s7, ctx) and changed(ctx, ann)
    assert [m.extra["trainable"] for m in outputs[:2]] == [[params.NEW_ROWS], [params.EMBED]]

    digests = [m.extra["first_batch_sha256"] for m in outputs]
    assert len(set(digests)) == len(digests)

    ctx_dir = Path(store.fetch(outputs[4].digest))
    cfg = yaml.safe_load((ctx_dir / "model_config.yaml").read_text())
    assert (cfg["rope_base"], cfg["block_size"]) == (40000, 128)
    ctx_evals = [e for e in read_events(ctx_dir / "metrics.jsonl") if e["event"] == "eval"]
    assert ctx_evals and ctx_evals[-1]["val_loss"] and all(v > 0 for v in ctx_evals[-1]["val_bpb"].values())

    lrs = [e["lr"] for e in events_of(env, outputs[5].digest) if e["event"] == "step"]
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:], strict=False))
    assert lrs[-1] == pytest.approx(5e-3 / 5)  # linear to zero: the last of 5 decay steps runs at lr/5
    assert {"vi", "en"} <= outputs[5].metrics["val_bpb"].keys()


def _error_before_training(env, job: StageJob, match: str) -> None:
    from vinasmol_core.train.engine import run_stage

    with pytest.raises(ConfigError, match=match):
        run_stage(job)
    assert store_of(env).list_refs(job.partial_ref_prefix) == {}
    assert not store_of(env).exists(job.out_ref)


def test_bad_inputs_fail_before_training(env, tmp_path) -> None:
    from vinasmol_core.builtin.fixtures import smollm2_config, write_litgpt_checkpoint
    from vinasmol_core.builtin.tiny import build_tiny_tokenizer
    from vinasmol_core.common.manifests import CheckpointManifest

    _error_before_training(
        env, make_job(env, stage_spec("bad-1", ["transformer.h.7.*"]), "bad"), r"pattern 'transformer.h.7.\*'"
    )
    _error_before_training(
        env, make_job(env, stage_spec("bad-2", "all", seq_len=128, max_tokens=10**5), "bad"), "block_size=64"
    )
    _error_before_training(
        env, make_job(env, stage_spec("bad-3", "all", micro_batch=3), "bad"), "micro_batch=3"
    )
    _error_before_training(
        env,
        make_job(env, stage_spec("bad-4", "all", max_tokens=100), "bad"),
        "smaller than one optimizer step",
    )
    # a checkpoint with another vocabulary than the dataset's tokenizer
    other_tok = build_tiny_tokenizer(tmp_path / "tok", vocab_size=1000)
    ckpt = write_litgpt_checkpoint(tmp_path / "other", smollm2_config(1000, block_size=64), other_tok)
    store_of(env).publish(CheckpointManifest(format="litgpt"), ckpt, ref="test/other-vocab")
    _error_before_training(
        env, make_job(env, stage_spec("bad-5", "all"), "bad", init="test/other-vocab"), "vocabularies differ"
    )


def test_micro_batch_search_keeps_the_largest_that_fits_an_injected_memory_limit(
    env, reference, monkeypatch
) -> None:
    """The smoke run's micro-batch search on the CPU, with the device's memory injected: with room for
    everything every candidate (1, 2, 4, 8) is tried and fits; with a limit whose 90% lies between
    the peaks of 4 and 8 sequences it keeps 4 and stops at 8. The peaks grow with the micro-batch,
    the choice comes with its tokens/s and `--set` line, and the weights the stage publishes are
    bit-identical to the same stage without a search."""
    from vinasmol_core.train.engine import run_stage
    from vinasmol_core.train.microbatch import MEMORY_ENV

    search = {"seq_len": 64, "max_micro_batch": 8}

    def run(tag: str, capacity: float | None) -> dict:
        if capacity is None:
            monkeypatch.delenv(MEMORY_ENV, raising=False)
        else:
            monkeypatch.setenv(MEMORY_ENV, str(int(capacity)))
        spec = stage_spec("eeve-3", "new-embeddings", micro_batch_search=search)
        manifest = run_stage(make_job(env, spec, tag))
        found = [e for e in events_of(env, manifest.digest) if e["event"] == "micro_batch_search"]
        assert len(found) == 1
        assert weights(env, manifest.digest).keys() == weights(env, reference.digest).keys()
        for name, value in weights(env, manifest.digest).items():
            assert torch.equal(value, weights(env, reference.digest)[name]), name
        return found[0]

    roomy = run("search-roomy", 1e15)
    peaks = [t["peak_bytes"] for t in roomy["trials"]]
    assert [t["micro_batch"] for t in roomy["trials"]] == [1, 2, 4, 8] and roomy["chosen"] == 8
    assert peaks == sorted(peaks) and peaks[0] < peaks[-1]
    limit = (peaks[2] + peaks[3]) / 2 / 0.9
    tight = run("search-tight", limit)
    assert [(t["micro_batch"], t["fits"]) for t in tight["trials"]] == [(1, 1), (2, 1), (4, 1), (8, 0)]
    assert tight["chosen"] == 4 and tight["set"] == "stages[eeve-3].micro_batch=4"
    assert tight["tokens_per_s"] > 0 and tight["capacity_bytes"] == int(limit)
    none_fits = run("search-none", peaks[0] / 2)
    assert none_fits["chosen"] is None and none_fits["set"] is None
    skipped = run("search-skipped", None)  # no memory figure for the CPU: no search, and it says why
    assert skipped["chosen"] is None and "VINASMOL_DEVICE_MEMORY" in skipped["skipped"]
