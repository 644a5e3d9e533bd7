"""Depth up-scaling (SOLAR): the up-scaled checkpoint's blocks are exactly the two copies, every
other tensor unchanged; it exports and loads in transformers; the step is in the recipe's plan."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.model_fixtures import shared_tiny
from vinasmol_core.common.errors import ConfigError
from vinasmol_core.model.upscale import block_sources, upscale_depth


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):  # noqa: ANN001, ANN201
    return shared_tiny(tmp_path_factory)


def test_the_upscaled_blocks_are_the_two_copies_and_it_loads_in_transformers(tiny, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from vinasmol_core.model.export import export_hf
    from vinasmol_core.model.litgpt_io import load_litgpt_config

    src = Path(tiny["lit"])
    n = load_litgpt_config(src).n_layer
    assert n == 2
    out = upscale_depth(src, tmp_path / "up", layers_from_each_copy=2)  # 2 x 2 = 4 blocks: [0, 1, 0, 1]
    assert load_litgpt_config(out).n_layer == 4
    before = torch.load(src / "lit_model.pth", weights_only=True)
    after = torch.load(out / "lit_model.pth", weights_only=True)
    for target, source in enumerate([0, 1, 0, 1]):
        for key, value in before.items():
            if key.startswith(f"transformer.h.{source}."):
                copied = after[f"transformer.h.{target}." + key[len(f"transformer.h.{source}."):]]
                assert torch.equal(copied, value), key
    for key, value in before.items():
        if not key.startswith("transformer.h."):
            assert torch.equal(after[key], value), key
    assert {p.name for p in src.iterdir()} == {p.name for p in out.iterdir()}  # tokenizer files travel

    hf = export_hf(out, tmp_path / "hf", dtype="float32")  # logits parity checked inside
    model = AutoModelForCausalLM.from_pretrained(hf)
    assert model.config.num_hidden_layers == 4
    assert torch.equal(model.model.layers[2].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight)


def test_solar_layout_and_bad_sizes() -> None:
    assert block_sources(32, 24) == [*range(24), *range(8, 32)]  # SOLAR: 32 blocks, 8 dropped per copy
    assert len(block_sources(30, 24)) == 48  # SmolLM2-135M to 48 blocks
    with pytest.raises(ConfigError, match="layers_from_each_copy"):
        block_sources(30, 31)


def test_the_step_follows_convert_to_litgpt_only_when_the_recipe_asks() -> None:
    from vinasmol_core.plan.recipe import load_recipe

    root = Path(__file__).resolve().parents[1]
    plain = load_recipe(root / "recipes" / "tiny-cpu.yaml")
    assert "upscale-depth" not in plain.step_names()
    up = load_recipe(root / "recipes" / "tiny-cpu.yaml", ["upscale={layers_from_each_copy: 2}",
                                                           "eval.long.after=[upscaled]"])
    names = up.step_names()
    assert names.index("upscale-depth") == names.index("convert-to-litgpt") + 1 < names.index("eeve-3")


def test_the_upscale_depth_step_publishes_a_litgpt_checkpoint(tiny, tmp_path: Path) -> None:
    from tasks.model import upscale_depth as step
    from vinasmol_core.model import publish_checkpoint
    from vinasmol_core.plan.recipe import UpscaleSection
    from vinasmol_core.store import ArtifactStore

    url = (tmp_path / "store").as_uri()
    store = ArtifactStore(url)
    converted = publish_checkpoint(store, Path(tiny["lit"]), "litgpt", name="converted", stage="convert")
    up = step.fn(converted.digest, UpscaleSection(layers_from_each_copy=2), url)
    assert up.format == "litgpt" and up.parents == [converted.digest]
    assert up.model_config_["n_layer"] == 4 and up.extra["upscale"] == {"layers_from_each_copy": 2}
