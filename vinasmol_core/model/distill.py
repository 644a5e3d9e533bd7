"""Self-distillation of the new rows of an extended embedding table (`embedding_init.method: distill`).

The new rows start at their subword means; then only they are fitted, with the base model as its
own teacher, on training text. The student is the extended model reading the extended tokenization
of a window of text; the teacher is the base model reading the base tokenization of the same text.
Every extended token is a run of base pieces (its segmentation), so the student position after
extended token j is aligned with the teacher position after that token's last piece: both have read
the same bytes. The loss of a batch is `input + out_weight * output`:

- input side: at every aligned position from a window's first new token on, the student's hidden
  states after decoder layer `layers` against the teacher's after the same bytes (squared error
  relative to the teacher state's squared norm; the final, normed states when `layers` covers the
  model). The text after a new token must leave the model in the state its pieces left the base
  model in (AweDist, arXiv 2510.21954, distils hidden states so). The student runs only up to
  that layer: an early layer keeps the backward pass short.
- output side: at every position, for the observed next extended token n, the teacher's
  probability of n's bytes, q = P_T(p1) P_T(p2 | p1) ... over n's pieces (one factor for a base
  token), against p, the probability of n under the extended vocabulary given the teacher's final
  state there (base logits are the teacher's; new logits come from the new rows):
  KL(Bernoulli(q) || Bernoulli(p)). For a new token it calibrates its output vector to the
  probability of its whole piece sequence; for a base token it keeps the new rows from taking the
  mass the teacher gives that token. Where the states match and p = q everywhere, the extended
  model's log-likelihood of the extended tokenization equals the base model's of the base
  tokenization: the same bits per byte.

The table is tied (a new row is both an input and an output vector), so both terms reach the same
rows; an untied model gets a second tensor for its output rows. Base rows and every other tensor
are never handed to the optimizer: the new rows are a tensor of their own, spliced into the
embedding lookup and the output projection. Deterministic for a given seed (window order) on CPU.
"""

from __future__ import annotations

import logging
import math
import random
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vinasmol_core.common.errors import ConfigError, VinaSmolError
from vinasmol_core.tokenizer.corpus import iter_documents

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

LOG = logging.getLogger(__name__)
EOT = "<|endoftext|>"
WINDOWS_PER_DOC = 2  # at most this many windows from one document: more documents, more contexts
CHARS_PER_TOKEN_CAP = 16  # a document is read up to this many characters per token it can give


@dataclass(frozen=True)
class DistillSettings:
    """Budget and optimiser of the distillation. `tokens`: extended-tokenizer tokens read by the
    student (the teacher reads the same text in base tokens); `layers`: the decoder layer whose
    states the input side matches (None or more than the model has: the final, normed states);
    `passes`: optimizer steps on each batch (the teacher's forward pass costs most)."""

    tokens: int = 16_384
    seq_len: int = 256
    batch_size: int = 4
    lr: float = 3e-3
    warmup_steps: int = 4
    out_weight: float = 1.0
    layers: int | None = 4
    passes: int = 1
    seed: int = 0
    log_every: int = 10
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("tokens", "seq_len", "batch_size", "passes", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"distill.{name}: must be positive, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ConfigError(f"distill.seq_len: must be at least 2, got {self.seq_len}")
        if not self.lr > 0:
            raise ConfigError(f"distill.lr: must be positive, got {self.lr}")
        if self.layers is not None and self.layers <= 0:
            raise ConfigError(f"distill.layers: must be positive (or None: all), got {self.layers}")
        if self.warmup_steps < 0 or self.out_weight < 0:
            raise ConfigError("distill.warmup_steps and distill.out_weight must not be negative")


@dataclass
class DistillResult:
    """The fitted new rows (input and, when untied, output) and how the run went."""

    new_in: torch.Tensor
    new_out: torch.Tensor | None
    details: dict[str, Any] = field(default_factory=dict)


def text_windows(
    tok: Tokenizer,
    sources: Sequence[tuple[Any, float]],
    tokens: int,
    seq_len: int,
    seed: int = 0,
    text_field: str = "text",
) -> tuple[list[list[int]], dict[str, int]]:
    """Windows of at most `seq_len` ids of `tok` (no special tokens), `tokens` ids in all, shared among
    `sources` (a corpus as `iter_documents` reads it, and its weight), shuffled by `seed`.

    Documents are NFC-normalised and read in order; each gives at most `WINDOWS_PER_DOC` windows."""
    total = sum(w for _, w in sources)
    if not sources or total <= 0:
        raise ConfigError("distill: no training text (give at least one corpus with a positive weight)")
    windows: list[list[int]] = []
    taken: dict[str, int] = {}
    for k, (corpus, weight) in enumerate(sources):
        share = int(round(tokens * weight / total))
        got = 0
        for text in iter_documents(corpus, text_field):
            if got >= share:
                break
            limit = WINDOWS_PER_DOC * seq_len * CHARS_PER_TOKEN_CAP
            cut = len(text) > limit
            ids = tok.encode(unicodedata.normalize("NFC", text[:limit]), add_special_tokens=False).ids
            if cut:
                ids = ids[:-1]  # the text was cut: its last token may be part of a longer one
            for start in range(0, min(len(ids), WINDOWS_PER_DOC * seq_len), seq_len):
                window = ids[start : start + min(seq_len, share - got)]
                if len(window) >= 2:
                    windows.append(window)
                    got += len(window)
                if got >= share:
                    break
        taken[f"source{k}"] = got
    if not windows:
        raise VinaSmolError("distill: the training text gave no window of two tokens or more")
    random.Random(seed).shuffle(windows)
    return windows, taken


class Distiller:
    """The distillation loss of the new rows on batches of extended-tokenizer windows."""

    def __init__(
        self,
        model: Any,
        base_size: int,
        segments: Sequence[Sequence[int]],
        eot: int,
        layers: int | None = None,
    ) -> None:

        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        self.tied = head.data_ptr() == emb.data_ptr()
        self.base_size = base_size
        self.device = emb.device
        self.in_old = emb.detach()[:base_size].float()
        self.out_old = self.in_old if self.tied else head.detach()[:base_size].float()
        self.pieces = [list(s) for s in segments]
        self.unsegmented = {base_size + k for k, s in enumerate(self.pieces) if not s}
        self.eot = eot
        n_layers = len(self.body.layers)
        self.layers = n_layers if layers is None else min(layers, n_layers)
        self.full = self.layers >= n_layers

    def usable(self, window: Sequence[int]) -> bool:
        """Whether the teacher can read the window (every new token in it has base pieces: a byte the
        base vocabulary lacks has none)."""
        return not self.unsegmented or not any(t in self.unsegmented for t in window)

    def _pieces_of(self, token: int) -> list[int]:
        return [token] if token < self.base_size else self.pieces[token - self.base_size]

    def _tensors(self, windows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Padded student ids, teacher ids, and the alignment of student to teacher positions."""
        import torch

        students = [[self.eot, *w] for w in windows]
        teachers: list[list[int]] = []
        lasts: list[list[int]] = []
        for s in students:
            t, last = [self.eot], [0]
            for token in s[1:]:
                t.extend(self._pieces_of(token))
                last.append(len(t) - 1)
            teachers.append(t)
            lasts.append(last)
        b, ls, lt = len(windows), max(map(len, students)), max(map(len, teachers))
        s_ids = torch.full((b, ls), self.eot, dtype=torch.long)
        t_ids = torch.full((b, lt), self.eot, dtype=torch.long)
        last = torch.zeros((b, ls), dtype=torch.long)
        valid = torch.zeros((b, ls), dtype=torch.bool)
        for i, (s, t, la) in enumerate(zip(students, teachers, lasts, strict=True)):
            s_ids[i, : len(s)] = torch.tensor(s)
            t_ids[i, : len(t)] = torch.tensor(t)
            last[i, : len(la)] = torch.tensor(la)
            valid[i, : len(s)] = True
        is_new = s_ids >= self.base_size
        seen_new = (is_new & valid).long().cumsum(1) > 0
        out = {"s": s_ids, "t": t_ids, "last": last, "valid": valid, "in_mask": seen_new & valid,
               "tlen": torch.tensor([len(t) for t in teachers])}
        return {k: v.to(self.device) for k, v in out.items()}

    def _layer_output(self, layer: int, stop: bool) -> tuple[Any, dict[str, Any]]:
        """A forward hook on decoder layer `layer` (1-based) keeping its output, and raising
        `_Stop` after it when `stop` (the student needs no layer above)."""
        kept: dict[str, Any] = {}

        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            kept["h"] = output[0] if isinstance(output, tuple) else output
            if stop:
                raise _Stop

        return self.body.layers[layer - 1].register_forward_hook(hook), kept

    def teacher(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the student is fitted to, at aligned positions: the teacher's hidden states at the
        input side's layer (where the input term counts); its final states, the log-normaliser of
        its base-vocabulary logits and the logit of a base next token (output side); log q of each
        observed next extended token."""
        import torch

        handle, kept = (None, {}) if self.full else self._layer_output(self.layers, stop=False)
        try:
            with torch.no_grad():
                final = self.body(input_ids=batch["t"], use_cache=False).last_hidden_state.float()
        finally:
            if handle is not None:
                handle.remove()
        mid = final if self.full else kept["h"].float()
        b, ls = batch["s"].shape
        dim = final.shape[-1]
        dev = self.device
        logq = torch.zeros((b, ls), device=dev)
        lse = torch.zeros((b, ls), device=dev)
        old_next = torch.zeros((b, ls), device=dev)
        h_final = torch.zeros((b, ls, dim), device=dev)
        h_in = []
        with torch.no_grad():
            for i in range(b):
                n_t, n_s = int(batch["tlen"][i]), int(batch["valid"][i].sum())
                logits = final[i, :n_t] @ self.out_old.T
                norm = torch.logsumexp(logits, dim=-1)
                # log P_T(piece k+1 | pieces <= k) for k = 0 .. n_t-2, and its prefix sums
                step = logits[:-1].gather(1, batch["t"][i, 1:n_t].unsqueeze(1)).squeeze(1) - norm[:-1]
                cum = torch.cat([torch.zeros(1, device=dev), step.cumsum(0)])
                la = batch["last"][i, :n_s]
                logq[i, : n_s - 1] = cum[la[1:]] - cum[la[:-1]]
                lse[i, :n_s] = norm[la]
                h_final[i, :n_s] = final[i, la]
                nxt = batch["s"][i, 1:n_s]
                old_next[i, : n_s - 1] = logits[la[:-1]].gather(
                    1, nxt.clamp(max=self.base_size - 1).unsqueeze(1)
                ).squeeze(1)
                h_in.append(mid[i, la[batch["in_mask"][i, :n_s]]])
        return {"logq": logq, "lse_old": lse, "old_next": old_next, "h_final": h_final,
                "h_in": torch.cat(h_in, 0)}

    def student_states(self, batch: dict[str, torch.Tensor], new_in: torch.Tensor) -> torch.Tensor:
        """The student's hidden states at the input side's layer (all positions)."""
        import torch
        import torch.nn.functional as F

        s = batch["s"]
        old_part = F.embedding(s.clamp(max=self.base_size - 1), self.in_old)
        new_part = F.embedding((s - self.base_size).clamp(min=0), new_in)
        embeds = torch.where((s >= self.base_size).unsqueeze(-1), new_part, old_part)
        if self.full:
            return self.body(inputs_embeds=embeds, use_cache=False).last_hidden_state.float()
        handle, kept = self._layer_output(self.layers, stop=True)
        try:
            self.body(inputs_embeds=embeds, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        return kept["h"].float()

    def loss(
        self,
        batch: dict[str, torch.Tensor],
        target: dict[str, torch.Tensor],
        new_in: torch.Tensor,
        new_out: torch.Tensor | None = None,
        out_weight: float = 1.0,
    ) -> tuple[torch.Tensor, float, float]:
        """(input + out_weight * output loss, input loss, output loss) of the student with these rows."""
        import torch

        new_out = new_in if new_out is None else new_out
        s = batch["s"]
        # input side: from the first new token on, the student's states at the input layer against
        # the teacher's after the same bytes (squared error relative to the teacher's squared norm)
        in_mask = batch["in_mask"]
        if bool(in_mask.any()):
            h_s = self.student_states(batch, new_in)[in_mask]
            h_t = target["h_in"]
            loss_in = ((h_s - h_t).pow(2).sum(1) / h_t.pow(2).sum(1).clamp(min=1e-6)).mean()
        else:
            loss_in = new_in.sum() * 0.0

        # output side, on the teacher's final states: Bernoulli KL of the observed next token,
        # q (teacher, its pieces) against p (student, over the whole extended vocabulary)
        h = target["h_final"][:, :-1]
        logits_new = h @ new_out.T
        lse_all = torch.logaddexp(target["lse_old"][:, :-1], torch.logsumexp(logits_new, dim=-1))
        nxt = s[:, 1:]
        new_next = logits_new.gather(2, (nxt - self.base_size).clamp(min=0).unsqueeze(2)).squeeze(2)
        logit = torch.where(nxt >= self.base_size, new_next, target["old_next"][:, :-1])
        logp = logit - lse_all
        out_mask = batch["valid"][:, 1:]
        loss_out = _bernoulli_kl(target["logq"][:, :-1], logp)[out_mask].mean()
        total = loss_in + out_weight * loss_out
        return total, float(loss_in.detach()), float(loss_out.detach())


class _Stop(Exception):
    """Raised by a hook to end the student's forward pass after the layers it needs."""


def _bernoulli_kl(logq: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(q) || Bernoulli(p)) from log q and log p, elementwise."""
    import torch

    tiny = 1e-6
    logp = logp.clamp(max=-tiny)
    logq = logq.clamp(max=-tiny)
    q = logq.exp()
    log1m_p = torch.log1p(-logp.exp())
    log1m_q = torch.log1p(-q)
    return q * (logq - logp) + (1 - q) * (log1m_q - log1m_p)


def _lr_at(step: int, total: int, settings: DistillSettings) -> float:
    """Linear warmup, then a cosine decay to a tenth of the peak."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / (settings.warmup_steps + 1)
    span = max(total - settings.warmup_steps, 1)
    frac = min((step - settings.warmup_steps) / span, 1.0)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def evaluate_loss(
    distiller: Distiller,
    windows: Sequence[Sequence[int]],
    new_in: torch.Tensor,
    new_out: torch.Tensor | None = None,
    batch_size: int = 4,
    out_weight: float = 1.0,
) -> float:
    """Mean distillation loss of these rows over `windows` (no update)."""
    import torch

    totals = []
    for start in range(0, len(windows), batch_size):
        batch = distiller._tensors(windows[start : start + batch_size])
        with torch.no_grad():
            total, _, _ = distiller.loss(batch, distiller.teacher(batch), new_in, new_out, out_weight)
        totals.append(float(total))
    return sum(totals) / max(len(totals), 1)


def distill_rows(
    model: Any,
    new_tok: Tokenizer,
    base_size: int,
    segments: Sequence[Sequence[int]],
    init_in: torch.Tensor,
    sources: Sequence[tuple[Any, float]],
    settings: DistillSettings = DistillSettings(),  # noqa: B008 - frozen dataclass
    init_out: torch.Tensor | None = None,
    log: Callable[[str], None] | None = None,
) -> DistillResult:
    """Fit the new rows (`init_in`, and `init_out` for an untied head) of `model` (the base model, an
    HF causal LM, left unchanged) by self-distillation on `sources`; see the module docstring."""
    import torch

    log = log or LOG.info
    eot = new_tok.token_to_id(EOT)
    if eot is None:
        raise VinaSmolError(f"distill: the tokenizer has no {EOT} token")
    t0 = time.perf_counter()
    windows, taken = text_windows(new_tok, sources, settings.tokens, settings.seq_len, settings.seed)
    distiller = Distiller(model, base_size, segments, eot, settings.layers)
    kept = [w for w in windows if distiller.usable(w)]
    dropped, windows = len(windows) - len(kept), kept
    if not windows:
        raise VinaSmolError("distill: no window of the training text can be read by the base model")
    if not distiller.tied and init_out is None:
        raise VinaSmolError("distill: the model's output embedding is untied; give its initial new rows")
    torch.manual_seed(settings.seed)
    device = distiller.device
    new_in = init_in.detach().float().to(device).clone().requires_grad_(True)
    params = [new_in]
    new_out = None
    if not distiller.tied:
        assert init_out is not None
        new_out = init_out.detach().float().to(device).clone().requires_grad_(True)
        params.append(new_out)
    opt = torch.optim.Adam(params, lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    steps = math.ceil(len(windows) / settings.batch_size)
    seen = teacher_tokens = 0
    history: list[dict[str, float]] = []
    tick, tick_tokens = time.perf_counter(), 0
    for i in range(steps):
        chunk = windows[i * settings.batch_size : (i + 1) * settings.batch_size]
        batch = distiller._tensors(chunk)
        target = distiller.teacher(batch)
        for group in opt.param_groups:
            group["lr"] = _lr_at(i, steps, settings)
        for _ in range(settings.passes):  # the teacher's targets serve several updates
            opt.zero_grad(set_to_none=True)
            total, loss_in, loss_out = distiller.loss(batch, target, new_in, new_out, settings.out_weight)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        n = sum(len(w) for w in chunk)
        seen += n
        tick_tokens += n
        teacher_tokens += int(batch["tlen"].sum()) - len(chunk)
        history.append({"step": i + 1, "loss": float(total.detach()), "input": loss_in, "output": loss_out})
        if (i + 1) % settings.log_every == 0 or i + 1 == steps or i == 0:
            now = time.perf_counter()
            log(
                f"distill step {i + 1}/{steps} loss {history[-1]['loss']:.4f} (input {loss_in:.4f}, "
                f"output {loss_out:.4f}) {tick_tokens / max(now - tick, 1e-9):.0f} tok/s"
            )
            tick, tick_tokens = now, 0
    first = history[:max(1, min(5, len(history)))]
    last = history[-max(1, min(5, len(history))):]
    details = {
        "tokens": seen,
        "teacher_tokens": teacher_tokens,
        "windows": len(windows),
        "windows_dropped": dropped,
        "steps": steps,
        "tokens_per_source": taken,
        "loss_first": sum(h["loss"] for h in first) / len(first),
        "loss_last": sum(h["loss"] for h in last) / len(last),
        "seconds": round(time.perf_counter() - t0, 2),
        "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
    }
    return DistillResult(
        new_in=new_in.detach().cpu(),
        new_out=new_out.detach().cpu() if new_out is not None else None,
        details=details,
    )
