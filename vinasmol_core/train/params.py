"""Tied embeddings, trainable policies and exact freezing on litgpt's GPT.

The tied embedding stays one tensor: `lm_head.weight is transformer.wte.weight`. Frozen tensors get
`requires_grad=False` and never reach the optimizer, so nothing (not even decoupled weight decay)
touches them. For the `new-embeddings` policy the tied table itself stays frozen and a separate
parameter holds the rows at and above the base vocabulary; the embedding and the output head both
read the composed table `cat(weight[:base], new_rows)`, and `merged_embedding` writes it back.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vinasmol_core.common.errors import ConfigError, VinaSmolError

EMBED = "transformer.wte.weight"
HEAD = "lm_head.weight"
NEW_ROWS = "transformer.wte.new_rows"


class SplitTiedEmbedding(nn.Module):
    """The tied table with a frozen `weight` (base rows live) and a trainable `new_rows` parameter."""

    def __init__(self, weight: nn.Parameter, base_vocab_size: int) -> None:
        super().__init__()
        self.base_vocab_size = base_vocab_size
        weight.requires_grad_(False)
        self.weight = weight
        self.new_rows = nn.Parameter(weight.detach()[base_vocab_size:].clone())

    def table(self) -> torch.Tensor:
        return torch.cat([self.weight[: self.base_vocab_size], self.new_rows], dim=0)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # two gathers instead of one over the composed table: no copy of the whole table per step, and
        # backward makes a gradient of the new rows only
        base = self.base_vocab_size
        old = F.embedding(idx.clamp(max=base - 1), self.weight[:base])
        new = F.embedding((idx - base).clamp(min=0), self.new_rows)
        return torch.where((idx >= base).unsqueeze(-1), new, old)


class SplitTiedHead(nn.Module):
    """The output head reading the same composed table (holds no parameter of its own)."""

    def __init__(self, embedding: SplitTiedEmbedding) -> None:
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # not a submodule: no duplicate parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # logits of the frozen rows and of the new rows: backward computes no gradient for the frozen
        # table, only for the new rows (and the input)
        table = self._embedding
        base = F.linear(x, table.weight[: table.base_vocab_size])
        return torch.cat([base, F.linear(x, table.new_rows)], dim=-1)


def tie_embeddings(model: nn.Module) -> None:
    """Make the output head share the input embedding's parameter."""
    model.lm_head.weight = model.transformer.wte.weight


def is_tied(model: nn.Module) -> bool:
    wte = model.transformer.wte
    if isinstance(wte, SplitTiedEmbedding):
        return isinstance(model.lm_head, SplitTiedHead) and model.lm_head._embedding is wte
    return model.lm_head.weight is wte.weight


_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter name without the segments FSDP, checkpoint wrappers or torch.compile insert, and
    without the `.linear` of a layer wrapped in litgpt's `LoRALinear` (ReLoRA): the base weight keeps
    its plain name."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name.replace(".linear.", ".")


def named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter once, under its canonical name (the tied table is `transformer.wte.weight`)."""
    out: dict[str, nn.Parameter] = {}
    seen: dict[int, str] = {}
    for raw_name, param in model.named_parameters(remove_duplicate=False):
        name = clean_name(raw_name)
        key = id(param)
        if key in seen:
            if name == EMBED:  # prefer the embedding's name over lm_head's
                del out[seen[key]]
                out[name] = param
                seen[key] = name
            continue
        seen[key] = name
        out[name] = param
    return out


def trainable_names(model: nn.Module) -> list[str]:
    return sorted(n for n, p in named_parameters(model).items() if p.requires_grad)


def apply_policy(model: nn.Module, policy: str | list[str], base_vocab_size: int | None = None) -> list[str]:
    """Freeze everything, then unfreeze what `policy` selects. Returns the trainable names.

    Raises ConfigError when a pattern matches nothing or the policy cannot apply to this model.
    """
    if not is_tied(model):
        raise ConfigError(
            "the model's embeddings are not tied (lm_head.weight is not transformer.wte.weight)"
        )
    params = named_parameters(model)
    for param in params.values():
        param.requires_grad_(False)
    if policy == "new-embeddings":
        # the tokenizer's size, not the table's rows: rows at and above vocab_size are padding
        vocab = model.config.vocab_size
        if base_vocab_size is None:
            raise ConfigError(
                "trainable=new-embeddings needs base_vocab_size (set it in the stage spec, or publish the "
                "initial checkpoint with extra.base_vocab_size)"
            )
        if not 0 < base_vocab_size < vocab:
            raise ConfigError(
                f"trainable=new-embeddings: base_vocab_size={base_vocab_size} leaves no new token in the "
                f"{vocab}-token vocabulary (the embedding's {model.transformer.wte.weight.shape[0]} rows "
                "above the vocabulary are padding, never trained)"
            )
        split = SplitTiedEmbedding(model.transformer.wte.weight, base_vocab_size)
        model.transformer.wte = split
        model.lm_head = SplitTiedHead(split)
    elif policy == "embeddings":
        params[EMBED].requires_grad_(True)
    elif policy == "all":
        for param in params.values():
            param.requires_grad_(True)
    elif policy == "transformer":
        for name, param in params.items():
            if name.startswith("transformer.h."):
                param.requires_grad_(True)
    elif isinstance(policy, list):
        for pattern in policy:
            hits = [
                n
                for n in params
                if fnmatch.fnmatchcase(n, pattern) or (n == EMBED and fnmatch.fnmatchcase(HEAD, pattern))
            ]
            if not hits:
                examples = ", ".join(list(params)[:4])
                raise ConfigError(
                    f"trainable pattern {pattern!r} matches no parameter (names look like {examples})"
                )
            for name in hits:
                params[name].requires_grad_(True)
    else:
        raise ConfigError(f"unknown trainable policy {policy!r}")
    names = trainable_names(model)
    if not names:
        raise ConfigError(f"trainable policy {policy!r} selects no parameter")
    return names


def merged_embedding(model: nn.Module) -> torch.Tensor:
    """The full tied table as it would be after writing trainable rows back (detached)."""
    wte = model.transformer.wte
    if isinstance(wte, SplitTiedEmbedding):
        return wte.table().detach()
    return wte.weight.detach()


def module_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Canonical parameter tensors of the training module (split form kept: `new_rows` separate)."""
    return {name: param.detach() for name, param in named_parameters(model).items()}


def load_module_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy tensors saved by `module_state` into a module with the same policy applied."""
    params = named_parameters(model)
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise VinaSmolError(
            f"train-state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A litgpt state dict (both tied keys name one tensor) with the trainable rows written back."""
    out: dict[str, torch.Tensor] = {}
    for name, param in named_parameters(model).items():
        if name == NEW_ROWS:
            continue
        out[name] = param.detach()
    out[EMBED] = merged_embedding(model)
    out[HEAD] = out[EMBED]
    return out


def load_lit_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a litgpt `lit_model.pth` (plain state dict, or a {"model": ...} training state) safely."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - corrupt or pickled objects: explain and stop
        raise VinaSmolError(f"cannot load {path} as tensors only: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or EMBED not in state:
        raise VinaSmolError(f"{path} is not a litgpt state dict (no {EMBED})")
    if HEAD not in state:
        state[HEAD] = state[EMBED]
    elif state[HEAD] is not state[EMBED] and not torch.equal(state[HEAD], state[EMBED]):
        raise ConfigError(f"{path}: lm_head.weight differs from transformer.wte.weight (untied checkpoint)")
    return state


def find_base_vocab_size(ckpt_dir: Path, manifest_extra: dict[str, Any]) -> int | None:
    """The base vocabulary size recorded with a checkpoint (manifest extra, or a JSON file beside it)."""
    for holder in (manifest_extra, manifest_extra.get("extension")):
        if isinstance(holder, dict) and isinstance(holder.get("base_vocab_size"), int):
            return holder["base_vocab_size"]
    for path in sorted(Path(ckpt_dir).glob("*.json")):
        if path.stat().st_size > 1_000_000:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("base_vocab_size"), int):
            return data["base_vocab_size"]
    return None
