"""Train-state files: RNG states, the model split into frozen and trainable tensors, AdamW state by
parameter name, and state.json, each written and read back the way a resumed stage does."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vinasmol_core.train import params as P
from vinasmol_core.train import state as S

BASE_VOCAB = 40


def _model(policy: str | list[str] = "new-embeddings", seed: int = 0) -> tuple[Any, list[str]]:
    """A tiny tied litgpt GPT with a trainable policy applied (returns the trainable names)."""
    from litgpt import Config
    from litgpt.model import GPT

    config = Config(name="tiny", block_size=16, vocab_size=48, padded_vocab_size=48, n_layer=1, n_head=2,
                    n_query_groups=1, n_embd=16, intermediate_size=32, norm_class_name="RMSNorm",
                    mlp_class_name="LLaMAMLP", bias=False, parallel_residual=False)
    torch.manual_seed(seed)
    model = GPT(config)
    P.tie_embeddings(model)
    return model, P.apply_policy(model, policy, BASE_VOCAB)


def _optimizer(model: Any) -> tuple[torch.optim.AdamW, dict[int, str]]:
    named = {n: p for n, p in P.named_parameters(model).items() if p.requires_grad}
    opt = torch.optim.AdamW([named[n] for n in sorted(named)], lr=1e-2, weight_decay=0.1)
    return opt, {id(p): n for n, p in named.items()}


def _step(model: Any, opt: torch.optim.Optimizer, seed: int) -> None:
    idx = torch.randint(0, 48, (2, 8), generator=torch.Generator().manual_seed(seed))
    loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()


# ----------------------------------------------------------------------------- RNG
def _draws() -> tuple[list[float], list[float], list[float], list[float]]:
    return (
        torch.rand(4).tolist(),
        np.random.normal(size=3).tolist(),  # odd count: leaves numpy's cached gaussian in use
        [random.random(), random.gauss(0, 1)],
        torch.randn(2).tolist(),
    )


def test_rng_state_round_trip_gives_the_same_random_numbers(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal()  # numpy's legacy normal caches the second of a pair: the cache is part of the state
    random.gauss(0, 1)  # so does Python's gauss
    path = tmp_path / "rng-rank0.safetensors"
    path.write_bytes(S.rng_state_bytes())
    expected = _draws()
    assert _draws() != expected  # the generators did move on

    meta = S.read_safetensors_metadata(path)
    assert set(meta) == {"numpy", "python"}
    assert set(load_file(str(path))) == {"torch", "numpy_keys"}  # no CUDA state on a CPU-only process
    S.restore_rng_state(path.read_bytes(), meta)
    assert _draws() == expected


def test_metadata_is_read_back_and_empty_when_absent(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    assert S.read_safetensors_metadata(tmp_path / "plain.safetensors") == {}
    save_file({"x": torch.zeros(1)}, str(tmp_path / "meta.safetensors"), metadata={"a": "1", "b": "[2]"})
    assert S.read_safetensors_metadata(tmp_path / "meta.safetensors") == {"a": "1", "b": "[2]"}


# ----------------------------------------------------------------------------- model state
def test_model_state_keeps_exactly_the_trainable_tensors_apart(tmp_path: Path) -> None:
    model, trainable = _model("new-embeddings")
    assert trainable == [P.NEW_ROWS]
    state = P.module_state(model)
    S.save_model_state(tmp_path, state, set(trainable))
    frozen = load_file(str(tmp_path / "model-frozen.safetensors"))
    train = load_file(str(tmp_path / "model-trainable.safetensors"))
    assert set(train) == {P.NEW_ROWS} and set(frozen) == set(state) - {P.NEW_ROWS}
    assert P.EMBED in frozen and P.HEAD not in frozen  # the tied table once, under its embedding name
    loaded = S.load_model_state(tmp_path)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) and loaded[k].dtype == state[k].dtype for k in state)

    fresh, _ = _model("new-embeddings", seed=5)
    P.load_module_state(fresh, loaded)
    assert all(torch.equal(a, b) for a, b in zip(P.module_state(fresh).values(), state.values(), strict=True))


def test_training_changes_only_the_trainable_file(tmp_path: Path) -> None:
    """Frozen tensors are written byte for byte the same after steps, so the store keeps one blob."""
    model, trainable = _model(["transformer.h.0.mlp.*"])
    opt, _ = _optimizer(model)
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    S.save_model_state(first, P.module_state(model), set(trainable))
    _step(model, opt, seed=0)
    S.save_model_state(second, P.module_state(model), set(trainable))
    frozen = "model-frozen.safetensors"
    assert (first / frozen).read_bytes() == (second / frozen).read_bytes()
    a = load_file(str(first / "model-trainable.safetensors"))
    b = load_file(str(second / "model-trainable.safetensors"))
    assert set(a) == set(trainable) and all(not torch.equal(a[k], b[k]) for k in a)


def test_all_trainable_writes_no_frozen_file(tmp_path: Path) -> None:
    model, trainable = _model("all")
    state = P.module_state(model)
    S.save_model_state(tmp_path, {k: v.t() if v.ndim == 2 else v for k, v in state.items()}, set(trainable))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-trainable.safetensors"]
    loaded = S.load_model_state(tmp_path)
    assert set(loaded) == set(state) and torch.equal(loaded[P.EMBED], state[P.EMBED].t())  # transposed saved


# ----------------------------------------------------------------------------- optimizer state
def test_optimizer_state_round_trip_continues_identically(tmp_path: Path) -> None:
    model, trainable = _model(["transformer.h.0.*", "transformer.ln_f.weight"])
    opt, names = _optimizer(model)
    for seed in range(2):
        _step(model, opt, seed)
    tensors = S.optimizer_tensors(opt, names)
    assert set(tensors) == {f"{n}/{f}" for n in trainable for f in ("step", "exp_avg", "exp_avg_sq")}
    assert all(float(tensors[f"{n}/step"]) == 2.0 for n in trainable)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "optimizer.safetensors"))
    S.save_model_state(tmp_path, P.module_state(model), set(trainable))

    resumed, _ = _model(["transformer.h.0.*", "transformer.ln_f.weight"], seed=9)
    P.load_module_state(resumed, S.load_model_state(tmp_path))
    opt2, names2 = _optimizer(resumed)
    S.load_optimizer_tensors(opt2, names2, load_file(str(tmp_path / "optimizer.safetensors")))
    _step(model, opt, seed=2)
    _step(resumed, opt2, seed=2)
    after, again = P.module_state(model), P.module_state(resumed)
    assert all(torch.equal(after[k], again[k]) for k in after)


def test_parameters_without_state_are_left_out_and_unknown_names_refused() -> None:
    model, _ = _model("embeddings")
    opt, names = _optimizer(model)
    assert S.optimizer_tensors(opt, names) == {}  # no step yet: nothing to save
    _step(model, opt, seed=0)
    tensors = S.optimizer_tensors(opt, names)
    assert set(tensors) == {f"{P.EMBED}/step", f"{P.EMBED}/exp_avg", f"{P.EMBED}/exp_avg_sq"}
    bad = {**tensors, "transformer.h.7.attn.qkv.weight/exp_avg": torch.zeros(1)}
    fresh, _ = _model("embeddings")
    opt2, names2 = _optimizer(fresh)
    with pytest.raises(ValueError, match=r"optimizer state for unknown parameters: \['transformer.h.7.attn"):
        S.load_optimizer_tensors(opt2, names2, bad)


# ----------------------------------------------------------------------------- state.json
def test_state_json_round_trip(tmp_path: Path) -> None:
    data = {"step": 12, "data_position": 48, "tokens": 3072, "world_size": 2, "resume_key": "k" * 64,
            "stage": "eeve-3", "loss": 2.25, "extra": {"ok": True, "ids": [1, 2]}}
    S.write_state_json(tmp_path, data)
    text = (tmp_path / S.STATE_FILE).read_text(encoding="utf-8")
    assert text.endswith("}\n") and list(json.loads(text)) == sorted(data)  # stable bytes: sorted keys
    assert S.read_state_json(tmp_path) == data
    with pytest.raises(FileNotFoundError, match="state.json"):
        S.read_state_json(tmp_path / "missing")
