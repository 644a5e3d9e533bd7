"""HF <-> litgpt conversion and the self-verifying HF export."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.model_fixtures import shared_tiny
from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.model import (
    convert,
    detect_litgpt_name,
    export_hf,
    hf_to_litgpt,
    litgpt_config_for,
    litgpt_io,
    load_litgpt_config,
    load_litgpt_weights,
    masked_logits,
)
from vinasmol_core.model import export as export_mod


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny(tmp_path_factory)


def _smollm2_config(hidden: int, layers: int, heads: int, kv: int, inter: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000,
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "vocab_size": 49152,
        "hidden_act": "silu",
    }


def test_roundtrip_is_bit_identical_in_fp32(tiny, tmp_path):
    out = export_hf(tiny["lit"], tmp_path / "hf", dtype="float32")
    src = load_file(str(tiny["ext"] / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(src) and "lm_head.weight" not in got
    for key, value in src.items():
        assert got[key].dtype == torch.float32
        assert torch.equal(got[key], value), key
    config = json.loads((out / "config.json").read_text())
    src_config = json.loads((tiny["ext"] / "config.json").read_text())
    for key in (
        "vocab_size",
        "hidden_size",
        "num_key_value_heads",
        "max_position_embeddings",
        "tie_word_embeddings",
    ):
        assert config[key] == src_config[key], key
    assert config["rope_theta"] == 10000.0 and config["rope_scaling"] is None
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 0, 0)
    info = json.loads((out / "export.json").read_text())
    assert info["parity_max_abs_diff"] <= 1e-4


def test_export_loads_with_auto_classes_and_generates(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    card = {
        "base_model": "tiny-base",
        "method": "EEVE",
        "data": {"vi": "sample"},
        "stages": [{"stage": "eeve-3", "tokens": 1000}],
        "metrics": {"bpb_vi": 2.5},
    }
    out = export_hf(tiny["lit"], tmp_path / "hf", card=card)  # bf16 default
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.vocab_size == len(tok)
    assert load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"].dtype == torch.bfloat16
    ids = tok("Hà Nội là thủ đô", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 6
    assert isinstance(tok.decode(gen[0]), str)
    readme = (out / "README.md").read_text()
    assert "tiny-base" in readme and "eeve-3" in readme and "bpb_vi" in readme
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 0


def test_parity_catches_wrong_rope_theta(tiny, tmp_path, monkeypatch):
    real = export_mod.hf_config_dict

    def wrong(*args, **kwargs):
        config = real(*args, **kwargs)
        config["rope_theta"] = 2 * config["rope_theta"]
        config["rope_parameters"]["rope_theta"] = config["rope_theta"]
        return config

    monkeypatch.setattr(export_mod, "hf_config_dict", wrong)
    with pytest.raises(VinaSmolError, match="parity check failed"):
        export_hf(tiny["lit"], tmp_path / "hf", dtype="float32")
    assert not (tmp_path / "hf").exists()
    assert list(tmp_path.iterdir()) == []


def test_parity_catches_untied_export_of_tied_weights(tiny, tmp_path, monkeypatch):
    real = export_mod.litgpt_state_to_hf

    def untied_without_head(state, config, vocab_size, tie):
        out = real(state, config, vocab_size, tie)
        out.pop("lm_head.weight", None)  # config says untied, the head tensor is lost
        return out

    monkeypatch.setattr(export_mod, "litgpt_state_to_hf", untied_without_head)
    with pytest.raises(VinaSmolError, match="parity check failed"):
        export_hf(tiny["lit"], tmp_path / "hf", dtype="float32", tie=False)
    assert not (tmp_path / "hf").exists()


def test_untied_checkpoint_is_exported_untied_and_forced_tie_fails(tiny, tmp_path):
    lit = tmp_path / "lit"
    shutil.copytree(tiny["lit"], lit)
    state, _ = load_litgpt_weights(lit / "lit_model.pth")
    state = {k: v.clone() for k, v in state.items()}
    state["lm_head.weight"] = state["lm_head.weight"] + 0.05 * torch.randn_like(state["lm_head.weight"])
    torch.save(state, lit / "lit_model.pth")
    with pytest.raises(VinaSmolError, match="parity check failed"):
        export_hf(lit, tmp_path / "forced", dtype="float32", tie=True)
    assert not (tmp_path / "forced").exists()
    out = export_hf(lit, tmp_path / "auto", dtype="float32")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(load_file(str(out / "model.safetensors"))["lm_head.weight"], state["lm_head.weight"])


def test_training_state_checkpoint_exports(tiny, tmp_path):
    lit = tmp_path / "lit"
    shutil.copytree(tiny["lit"], lit)
    state, _ = load_litgpt_weights(lit / "lit_model.pth")
    train_state = {
        "model": {f"_orig_mod.{k}": v.clone() for k, v in state.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
        "iter_num": 12,
        "step_count": 3,
    }
    torch.save(train_state, lit / "lit_model.pth")
    out = export_hf(lit, tmp_path / "hf", dtype="float32")
    src = load_file(str(tiny["ext"] / "model.safetensors"))
    assert torch.equal(
        load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"],
        src["model.embed_tokens.weight"],
    )
    assert json.loads((out / "export.json").read_text())["training_state"]["iter_num"] == 12


def test_checkpoint_not_matching_its_config_is_refused(tiny, tmp_path):
    lit = tmp_path / "lit"
    shutil.copytree(tiny["lit"], lit)
    config = yaml.safe_load((lit / "model_config.yaml").read_text())
    config["intermediate_size"] = 256
    (lit / "model_config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(VinaSmolError, match="does not match its config.*mlp"):
        export_hf(lit, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_unknown_litgpt_name_is_refused(tiny, tmp_path):
    with pytest.raises(VinaSmolError, match="not a litgpt model name"):
        hf_to_litgpt(tiny["ext"], tmp_path / "lit", litgpt_name="SmolLM2-7T")
    with pytest.raises(VinaSmolError, match="does not describe litgpt's 'SmolLM2-135M'"):
        hf_to_litgpt(tiny["ext"], tmp_path / "lit", litgpt_name="SmolLM2-135M")
    assert not (tmp_path / "lit").exists()


def test_litgpt_folder_contents(tiny):
    config = load_litgpt_config(tiny["lit"])
    vocab = json.loads((tiny["ext"] / "config.json").read_text())["vocab_size"]
    assert config.name == convert.CUSTOM_NAME  # tiny shapes are not in litgpt's table
    assert config.vocab_size == config.padded_vocab_size == vocab
    assert config.rope_base == 10000 and config.block_size == 512
    state, _ = load_litgpt_weights(tiny["lit"] / "lit_model.pth")
    assert torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    for name in ("tokenizer.json", "tokenizer_config.json", "extension.json"):
        assert (tiny["lit"] / name).is_file()


def test_mapping_agrees_with_litgpts_own_converter(tiny):
    from litgpt.scripts.convert_hf_checkpoint import copy_weights_hf_llama

    config = load_litgpt_config(tiny["lit"])
    theirs: dict = {}
    copy_weights_hf_llama(config, {}, theirs, load_file(str(tiny["ext"] / "model.safetensors")))
    ours, _ = load_litgpt_weights(tiny["lit"] / "lit_model.pth")
    assert set(theirs) == set(ours)
    for key in ours:
        assert torch.equal(theirs[key], ours[key]), key


@pytest.mark.parametrize(
    ("shape", "name"),
    [((576, 30, 9, 3, 1536), "SmolLM2-135M"), ((960, 32, 15, 5, 2560), "SmolLM2-360M")],
)
def test_smollm2_configs_come_from_litgpts_name_table(shape, name):
    config_json = _smollm2_config(*shape)
    assert detect_litgpt_name(config_json, 49152) == name
    config = litgpt_config_for(config_json, 55936, 55936)
    assert config.name == name
    assert (config.vocab_size, config.padded_vocab_size) == (55936, 55936)
    assert config.hf_config["org"] == "HuggingFaceTB"
    assert config.rope_base == 100000 and config.block_size == 8192
    # a changed RoPE base in config.json (context extension) wins over the table
    config_json["rope_theta"] = 250000.0
    assert litgpt_config_for(config_json, 49152, 49152, litgpt_name=name).rope_base == 250000


def test_padded_rows_are_masked_in_litgpt_and_cut_in_export(tiny, tmp_path):
    lit = hf_to_litgpt(tiny["ext"], tmp_path / "lit", pad_multiple=64)
    config = load_litgpt_config(lit)
    assert config.padded_vocab_size % 64 == 0 and config.padded_vocab_size > config.vocab_size
    state, _ = load_litgpt_weights(lit / "lit_model.pth")
    assert not state["transformer.wte.weight"][config.vocab_size :].any()
    # make the padded rows as attractive as possible: without masking they would win every argmax
    model = litgpt_io.build_litgpt_model(config, state)
    with torch.no_grad():
        model.transformer.wte.weight[config.vocab_size :] = 0
        model.lm_head.weight[config.vocab_size :] = 1e3
        model.lm_head.weight[config.vocab_size :] *= torch.sign(model.transformer.ln_f.weight)
        ids = torch.randint(0, config.vocab_size, (2, 16))
        raw = model(ids)
        assert (raw.argmax(-1) >= config.vocab_size).any()
        logits = masked_logits(raw, config.vocab_size)
        assert (logits.argmax(-1) < config.vocab_size).all()
        sampled = torch.multinomial(torch.softmax(logits[:, -1], -1), 200, replacement=True)
        assert (sampled < config.vocab_size).all()
    out = export_hf(lit, tmp_path / "hf", dtype="float32")
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["vocab_size"] == config.vocab_size
    assert (
        load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"].shape[0] == config.vocab_size
    )
