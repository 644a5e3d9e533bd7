"""The litgpt folder: config and weights in and out, state checks, the model built from them, the
litgpt -> HF weight layout (checked against transformers' own LlamaForCausalLM) and padded logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.model import hf_io, litgpt_io

VOCAB = 60  # the tokenizer's size; the model below pads its table to 64 rows


def _config(**overrides: Any) -> Any:
    from litgpt import Config

    fields: dict[str, Any] = {
        "name": "tiny-llama",
        "block_size": 32,
        "vocab_size": VOCAB,
        "padded_vocab_size": 64,
        "n_layer": 2,
        "n_head": 4,
        "n_query_groups": 2,
        "n_embd": 32,
        "intermediate_size": 48,
        "norm_class_name": "RMSNorm",
        "norm_eps": 1e-5,
        "mlp_class_name": "LLaMAMLP",
        "bias": False,
        "parallel_residual": False,
        "rotary_percentage": 1.0,
        "rope_base": 10000,
    }
    fields.update(overrides)
    return Config(**fields)


def _state(config: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights (norms included, so a wrong mapping shows) of a litgpt GPT built from `config`."""
    from litgpt.model import GPT

    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- config checks
def test_plain_llama_config_has_no_problems_and_others_are_listed() -> None:
    assert litgpt_io.plain_llama_problems(_config()) == []
    problems = litgpt_io.plain_llama_problems(_config(bias=True, mlp_class_name="GptNeoxMLP"))
    assert sorted(problems) == ["bias=True", "mlp_class_name='GptNeoxMLP'"]
    gemma = litgpt_io.plain_llama_problems(_config(name="Gemma-tiny"))
    assert gemma == ["name='Gemma-tiny' (Gemma RMSNorm offset)"]


def test_rope_adjustments_become_hf_rope_scaling() -> None:
    assert litgpt_io.hf_rope_scaling(None) is None
    assert litgpt_io.hf_rope_scaling({}) is None
    llama3 = {"factor": 8, "low_freq_factor": 1, "high_freq_factor": 4, "original_max_seq_len": 8192.0}
    out = litgpt_io.hf_rope_scaling(llama3)
    assert out == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert isinstance(out["factor"], float) and isinstance(out["original_max_position_embeddings"], int)
    assert litgpt_io.hf_rope_scaling({"factor": 2}) == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(VinaSmolError, match=r"model_config.yaml: rope_adjustments .*'beta_fast'"):
        litgpt_io.hf_rope_scaling({"factor": 2, "beta_fast": 32})


# ----------------------------------------------------------------------------- config files
def test_config_round_trip(tmp_path: Path) -> None:
    config = _config(rope_base=100000, norm_eps=1e-6)
    litgpt_io.save_litgpt_config(config, tmp_path)
    assert (tmp_path / litgpt_io.LIT_CONFIG).is_file()
    loaded = litgpt_io.load_litgpt_config(tmp_path)
    assert loaded.__dict__ == config.__dict__
    assert (loaded.rope_base, loaded.norm_eps, loaded.padded_vocab_size) == (100000, 1e-6, 64)


def test_missing_or_invalid_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(VinaSmolError, match=f"{tmp_path} has no model_config.yaml"):
        litgpt_io.load_litgpt_config(tmp_path)
    litgpt_io.save_litgpt_config(_config(), tmp_path)
    path = tmp_path / litgpt_io.LIT_CONFIG
    data = yaml.safe_load(path.read_text())
    data["n_layerz"] = 3
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(VinaSmolError, match=r"model_config.yaml: not a valid litgpt config: .*n_layerz"):
        litgpt_io.load_litgpt_config(tmp_path)


# ----------------------------------------------------------------------------- weights files
def test_plain_and_training_state_weights_load(tmp_path: Path) -> None:
    state = _state(_config())
    plain = tmp_path / "plain.pth"
    torch.save(state, plain)
    weights, meta = litgpt_io.load_litgpt_weights(plain)
    assert meta == {} and weights.keys() == state.keys()
    assert all(torch.equal(weights[k], state[k]) for k in state)

    # a training state: wrapper prefixes removed, scalar entries kept, non-scalar ones (optimizer) dropped
    wrapped = {f"_forward_module._orig_mod.{k}" if i % 2 else f"module.{k}": v for i, (k, v) in
               enumerate(state.items())}
    train = tmp_path / "train.pth"
    torch.save({"model": wrapped, "step_count": 7, "iter_num": 14, "stage": "eeve-3", "loss": 2.5,
                "optimizer": {"state": {}}}, train)
    weights, meta = litgpt_io.load_litgpt_weights(train)
    assert meta == {"step_count": 7, "iter_num": 14, "stage": "eeve-3", "loss": 2.5}
    assert weights.keys() == state.keys()
    assert all(torch.equal(weights[k], state[k]) for k in state)


def test_bad_weights_files_are_refused_by_name(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pth"
    with pytest.raises(VinaSmolError, match=f"{missing} does not exist"):
        litgpt_io.load_litgpt_weights(missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(VinaSmolError, match=f"{garbage}: cannot be read as a weights-only checkpoint"):
        litgpt_io.load_litgpt_weights(garbage)
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(VinaSmolError, match=f"{tensor}: expected a state dict, found Tensor"):
        litgpt_io.load_litgpt_weights(tensor)
    odd = tmp_path / "odd.pth"
    torch.save({"transformer.wte.weight": torch.zeros(2, 2), "transformer.note": [1, 2]}, odd)
    with pytest.raises(VinaSmolError, match=f"{odd}: entry 'transformer.note' is not a tensor"):
        litgpt_io.load_litgpt_weights(odd)


# ----------------------------------------------------------------------------- state checks and model
def test_state_check_fills_the_tied_head_and_names_what_does_not_fit() -> None:
    config = _config()
    state = _state(config)
    state.pop("lm_head.weight")
    completed = litgpt_io.check_state_matches_config(state, config, "ckpt")
    assert completed["lm_head.weight"] is state["transformer.wte.weight"]
    assert "lm_head.weight" not in state  # the caller's dict is left alone

    bad = dict(state)
    bad["transformer.ln_f.weight"] = torch.zeros(31)
    bad.pop("transformer.h.1.mlp.proj.weight")
    bad["transformer.h.9.attn.qkv.weight"] = torch.zeros(1)
    with pytest.raises(VinaSmolError) as info:
        litgpt_io.check_state_matches_config(bad, config, "runs/x/eeve-3")
    msg = str(info.value)
    assert msg.startswith("runs/x/eeve-3: the checkpoint does not match its config: ")
    assert "shape mismatch transformer.ln_f.weight: (31,) in the checkpoint, (32,) from the config" in msg
    assert "missing transformer.h.1.mlp.proj.weight" in msg
    assert "unexpected transformer.h.9.attn.qkv.weight" in msg


def test_built_model_computes_what_the_original_computes() -> None:
    from litgpt.model import GPT

    config = _config()
    state = _state(config)
    reference = GPT(config)
    reference.load_state_dict(state)
    reference.eval()
    model = litgpt_io.build_litgpt_model(config, state)
    assert not model.training
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(idx), reference(idx))
    half = litgpt_io.build_litgpt_model(config, state, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with pytest.raises(VinaSmolError, match="tiny-llama: the checkpoint does not match its config"):
        litgpt_io.build_litgpt_model(_config(n_embd=16, n_head=2, n_query_groups=1), state)


# ----------------------------------------------------------------------------- litgpt -> HF
def _hf_llama(config: Any, hf_state: dict[str, torch.Tensor], tie: bool) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=config.n_embd,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_query_groups,
        max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps,
        rope_theta=float(config.rope_base),
        tie_word_embeddings=tie,
        attention_bias=False,
        mlp_bias=False,
    )
    hf_config._attn_implementation = "eager"
    model = LlamaForCausalLM(hf_config)
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tie else set()), (missing, unexpected)
    if tie:
        model.tie_weights()
    return model.eval()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_hf_layout_gives_the_same_logits_in_llama_for_causal_lm(tie: bool) -> None:
    config = _config()
    state = _state(config, seed=2)
    if tie:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    hf_state = litgpt_io.litgpt_state_to_hf(state, config, VOCAB, tie=tie)
    assert (hf_io.LM_HEAD_KEY in hf_state) is not tie
    assert hf_state[hf_io.EMBED_KEY].shape == (VOCAB, config.n_embd)  # padded rows cut away
    q_size = config.n_head * config.head_size
    kv_size = config.n_query_groups * config.head_size
    assert hf_state["model.layers.0.self_attn.q_proj.weight"].shape == (q_size, config.n_embd)
    assert hf_state["model.layers.1.self_attn.v_proj.weight"].shape == (kv_size, config.n_embd)
    down = hf_state["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(down, state["transformer.h.1.mlp.proj.weight"])

    lit = litgpt_io.build_litgpt_model(config, state)
    hf = _hf_llama(config, hf_state, tie)
    idx = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = lit(idx)[..., :VOCAB]
        got = hf(idx).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_untied_export_without_head_reuses_the_embedding_and_unknown_weights_are_refused() -> None:
    config = _config()
    state = _state(config)
    state.pop("lm_head.weight")
    hf_state = litgpt_io.litgpt_state_to_hf(state, config, VOCAB, tie=False)
    assert torch.equal(hf_state[hf_io.LM_HEAD_KEY], state["transformer.wte.weight"][:VOCAB])
    assert hf_state[hf_io.LM_HEAD_KEY].data_ptr() != hf_state[hf_io.EMBED_KEY].data_ptr()  # own copies
    for key in ("transformer.h.0.attn.rotary.inv_freq", "transformer.extra.weight"):
        with pytest.raises(VinaSmolError, match=f"weight '{key}' has no LlamaForCausalLM counterpart"):
            litgpt_io.litgpt_state_to_hf({**state, key: torch.zeros(1)}, config, VOCAB, tie=True)


# ----------------------------------------------------------------------------- padded logits
def test_masked_logits_hide_padded_rows_only() -> None:
    logits = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(4))
    original = logits.clone()
    masked = litgpt_io.masked_logits(logits, VOCAB)
    assert torch.equal(logits, original)  # the input is not modified
    assert torch.equal(masked[..., :VOCAB], logits[..., :VOCAB])
    assert torch.isneginf(masked[..., VOCAB:]).all()
    assert int(torch.softmax(masked, -1)[..., VOCAB:].sum()) == 0
    assert masked.argmax(-1).max() < VOCAB
    assert litgpt_io.masked_logits(logits, 64) is logits
