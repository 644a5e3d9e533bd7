"""The chunked loss (lm_head and cross-entropy a few positions at a time, recomputed in backward)
against the whole micro-batch's fp32 logits: the same loss and gradients, for a plain tied head and for
the split head of `new-embeddings`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


def _model(policy: str | None):
    from litgpt.model import GPT

    from vinasmol_core.builtin.fixtures import smollm2_config
    from vinasmol_core.train import params

    config = smollm2_config(96, block_size=64)
    config.padded_vocab_size = 128  # rows above the vocabulary never enter the loss
    torch.manual_seed(0)
    model = GPT(config)
    model.apply(model._init_weights)
    params.tie_embeddings(model)
    model.max_seq_length = 40
    if policy is not None:
        params.apply_policy(model, policy, base_vocab_size=80)
    return model


@pytest.mark.parametrize("policy", [None, "new-embeddings"])
def test_chunked_loss_equals_the_full_logits_loss(policy) -> None:
    from lightning.fabric import Fabric

    from vinasmol_core.train.engine import lm_loss

    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    model = _model(policy)
    module = fabric.setup_module(model)
    batch = torch.randint(0, 96, (3, 41), generator=torch.Generator().manual_seed(1))
    x, y = batch[:, :-1], batch[:, 1:]
    trainable = [p for p in model.parameters() if p.requires_grad]

    logits = module(x)
    assert logits.shape[-1] == 128
    today = F.cross_entropy(logits[..., :96].reshape(-1, 96).float(), y.reshape(-1))
    expected_grads = torch.autograd.grad(today, trainable)
    for chunk in (7, 16, 40, 64):  # 7 does not divide the 40 positions; 64 is one chunk
        loss = lm_loss(fabric, module, model, x, y, 96, loss_chunk=chunk)
        assert abs(loss.item() - today.item()) <= 1e-5 * abs(today.item()), chunk
        grads = torch.autograd.grad(loss, trainable)
        for g, e in zip(grads, expected_grads, strict=True):
            assert torch.allclose(g, e, rtol=1e-4, atol=1e-7), chunk
        assert model.lm_head.__class__.__name__ != "_HiddenStates"  # the head is back after each call
    with torch.no_grad():  # evaluation: summed, no recomputation
        total = lm_loss(fabric, module, model, x, y, 96, loss_chunk=16, reduction="sum")
    assert abs(total.item() / y.numel() - today.item()) <= 1e-5 * abs(today.item())
