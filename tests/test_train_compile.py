"""A stage under torch.compile (inductor, on the CPU) against the same stage in eager mode, and
`compile: auto` (on for CUDA, off on the CPU)."""

from __future__ import annotations

import pytest

from tests.test_train_engine import events_of, make_job, stage_spec, step_losses, weights
from vinasmol_core.train import params
from vinasmol_core.train.spec import StageJob, StageSpec

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from vinasmol_core.builtin.fixtures import build_tiny_inputs

    root = tmp_path_factory.mktemp("compile")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VINASMOL_CACHE", str(root / "cache"))
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))  # a cold compile, nothing shared
        (root / "tmp").mkdir()
        mp.setenv("TMPDIR", str(root / "tmp"))
        yield build_tiny_inputs(root / "inputs", (root / "store").as_uri(), block_size=64)


def test_compile_auto_is_on_for_cuda_only(monkeypatch) -> None:
    from vinasmol_core.train.process import stage_env
    from vinasmol_core.train.runtime import compile_enabled

    spec = StageSpec(name="s", trainable="all", lr=1e-3, max_tokens=10**6, mixture={"vi": 1.0})
    assert spec.compile == "auto"
    assert compile_enabled(spec, "cuda") and not compile_enabled(spec, "cpu")
    assert compile_enabled(spec.model_copy(update={"compile": True}), "cpu")
    assert not compile_enabled(spec.model_copy(update={"compile": False}), "cuda")
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    on_cpu = spec.model_copy(update={"accelerator": "cpu"})
    assert stage_env(StageJob(spec=on_cpu, init_checkpoint="a", dataset="b"))["TORCHDYNAMO_DISABLE"] == "1"
    forced = on_cpu.model_copy(update={"compile": True})
    assert "TORCHDYNAMO_DISABLE" not in stage_env(StageJob(spec=forced, init_checkpoint="a", dataset="b"))


def test_compiled_stage_matches_eager(env, monkeypatch) -> None:
    """EEVE stage 7 (transformer blocks; embedding and final norm frozen), 8 steps, compiled with
    inductor on the CPU: losses within 1e-4 of eager, the frozen tensors bit-identical."""
    import torch._dynamo

    from vinasmol_core.train.engine import run_stage

    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    monkeypatch.setattr(torch._dynamo.config, "disable", False)
    torch._dynamo.reset()
    kw = dict(max_tokens=8 * 4 * 32, checkpoint_interval=8, eval_sequences=0, eval_at_start=False)
    eager = run_stage(make_job(env, stage_spec("eeve-7", "transformer", compile=False, **kw), "eager"))
    compiled = run_stage(
        make_job(env, stage_spec("eeve-7", "transformer", compile=True, **kw), "compiled")
    )
    torch._dynamo.reset()
    l_eager = step_losses(events_of(env, eager.digest))
    l_compiled = step_losses(events_of(env, compiled.digest))
    assert list(l_eager) == list(l_compiled) == list(range(1, 9))
    for step, loss in l_eager.items():
        assert abs(loss - l_compiled[step]) <= 1e-4, (step, loss, l_compiled[step])
    w_eager, w_compiled = weights(env, eager.digest), weights(env, compiled.digest)
    init = weights(env, env.init_ref)
    frozen = [params.EMBED, params.HEAD, "transformer.ln_f.weight"]
    for name in frozen:
        assert torch.equal(w_compiled[name], init[name]) and torch.equal(w_eager[name], init[name]), name
    moved = [n for n in init if n not in frozen and not torch.equal(w_compiled[n], init[n])]
    assert moved, "the compiled stage trained nothing"
