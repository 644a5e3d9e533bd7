"""Continued BPE training: learn new merges on top of a base tokenizer's segmentation.

Every distinct word starts as its base segmentation (what the base BPE model gives it). Then the
most frequent adjacent pair of tokens is merged into a new token, again and again, with pair
counts kept up to date incrementally (a pair -> words index and a lazy max-heap). Because the
new merges rank after every base merge and each one only combines tokens that exist when it is
learned, the Rust BPE model that applies base merges + new merges in rank order segments every
training word exactly as this trainer did (the caller verifies it).

Rules on top of plain BPE:
- a merge must make a new string: a pair whose concatenation already is a token (a base token
  the base merges never build in that context, or an added token) is skipped;
- no merge may use up every occurrence of an earlier new token, so each new token is still
  produced somewhere in the training words at the end (a merge that would is skipped);
- pairs seen fewer than `min_frequency` times are not merged; when the pairs run out before
  the target, training stops short and says so.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field

_SHIFT = 21  # token ids < 2**21
_MASK = (1 << _SHIFT) - 1


@dataclass
class TrainResult:
    merges: list[tuple[int, int]]  # (left id, right id) of each new merge, in rank order
    tokens: list[str]  # string of each new token; new token i has id base_size + i
    merge_counts: list[int]  # pair count when each merge was learned
    token_counts: list[int]  # occurrences of each new token in the final segmentation
    seqs: list[list[int]]  # final segmentation of every word
    skipped_existing: int = 0
    skipped_exhausting: int = 0
    stopped_early: bool = False
    notes: list[str] = field(default_factory=list)


def _pairs(seq: list[int]) -> list[int]:
    return [(x << _SHIFT) | y for x, y in zip(seq, seq[1:], strict=False)]


def continue_bpe(
    seqs: Iterable[list[int]],
    freqs: list[int],
    token_strings: list[str],
    n_new: int,
    *,
    reserved: set[str] | None = None,
    forbidden: set[tuple[int, int]] | None = None,
    min_frequency: int = 2,
) -> TrainResult:
    """Learn up to `n_new` merges on words `seqs` (base token ids) occurring `freqs` times.

    `token_strings`: the base vocabulary (id -> string). `reserved`: strings that new tokens must
    not take (e.g. added tokens). `forbidden`: pairs never to merge."""
    seqs = [list(s) for s in seqs]
    base_size = len(token_strings)
    if base_size + n_new > _MASK:
        raise ValueError("vocabulary too large for the trainer's pair keys")
    strings = list(token_strings)
    known = set(strings) | set(reserved or ())
    blocked = {(a << _SHIFT) | b for a, b in (forbidden or ())}
    pair_count, where, tok_count = _count_pairs(seqs, freqs)
    heap = [(-c, k) for k, c in pair_count.items() if k not in blocked]
    heapq.heapify(heap)

    result = TrainResult(merges=[], tokens=[], merge_counts=[], token_counts=[], seqs=seqs)
    while len(result.merges) < n_new:
        best = _pop_best(heap, pair_count, blocked)
        if best is None:
            result.stopped_early = True
            break
        count, k = best
        if count < min_frequency:
            result.stopped_early = True
            break
        a, b = k >> _SHIFT, k & _MASK
        text = strings[a] + strings[b]
        if text in known:
            blocked.add(k)
            result.skipped_existing += 1
            continue
        new_id = base_size + len(result.tokens)
        updates, applied = _merged_words(seqs, freqs, where.get(k, ()), a, b, new_id)
        used_a = applied * (2 if a == b else 1)
        if (a >= base_size and tok_count.get(a, 0) - used_a <= 0) or (
            b >= base_size and a != b and tok_count.get(b, 0) - applied <= 0
        ):
            blocked.add(k)
            result.skipped_exhausting += 1
            continue
        # Commit.
        strings.append(text)
        known.add(text)
        result.merges.append((a, b))
        result.tokens.append(text)
        result.merge_counts.append(count)
        tok_count[a] = tok_count.get(a, 0) - used_a
        if a != b:
            tok_count[b] = tok_count.get(b, 0) - applied
        tok_count[new_id] = applied
        for p in _update_pairs(seqs, freqs, updates, pair_count, where):
            if p not in blocked:
                heapq.heappush(heap, (-pair_count[p], p))
        pair_count.pop(k, None)
        where.pop(k, None)
    result.token_counts = [tok_count.get(base_size + i, 0) for i in range(len(result.tokens))]
    return result


def _pop_best(
    heap: list[tuple[int, int]], pair_count: dict[int, int], blocked: set[int]
) -> tuple[int, int] | None:
    """(count, pair) of the most frequent pair whose heap entry is current (stale entries are pushed
    back with their current count, or dropped); None when the heap runs out."""
    while heap:
        neg, k = heapq.heappop(heap)
        count = pair_count.get(k, 0)
        if count == -neg:
            return count, k
        if count > 0 and k not in blocked:
            heapq.heappush(heap, (-count, k))
    return None


def _count_pairs(
    seqs: list[list[int]], freqs: list[int]
) -> tuple[dict[int, int], dict[int, set[int]], dict[int, int]]:
    """Weighted counts of every adjacent pair, the words holding each pair, and token counts."""
    pair_count: dict[int, int] = {}
    where: dict[int, set[int]] = {}
    tok_count: dict[int, int] = {}
    for wi, (seq, f) in enumerate(zip(seqs, freqs, strict=True)):
        for t in seq:
            tok_count[t] = tok_count.get(t, 0) + f
        for k in _pairs(seq):
            pair_count[k] = pair_count.get(k, 0) + f
            s = where.get(k)
            if s is None:
                where[k] = {wi}
            else:
                s.add(wi)
    return pair_count, where, tok_count


def _merged_words(
    seqs: list[list[int]], freqs: list[int], words: Iterable[int], a: int, b: int, new_id: int
) -> tuple[list[tuple[int, list[int], int]], int]:
    """The merge (a, b) -> new_id applied to `words` (left to right, as the Rust model does): each
    changed word as (index, new sequence, hits), and the weighted number of merges made."""
    updates: list[tuple[int, list[int], int]] = []
    applied = 0
    for wi in words:
        seq = seqs[wi]
        out: list[int] = []
        i, n, hits = 0, len(seq), 0
        while i < n:
            if i + 1 < n and seq[i] == a and seq[i + 1] == b:
                out.append(new_id)
                i += 2
                hits += 1
            else:
                out.append(seq[i])
                i += 1
        if hits:
            updates.append((wi, out, hits))
            applied += hits * freqs[wi]
    return updates, applied


def _update_pairs(seqs: list[list[int]], freqs: list[int], updates: list[tuple[int, list[int], int]],
                  pair_count: dict[int, int], where: dict[int, set[int]]) -> set[int]:
    """Replace the merged words and their pair counts and index; returns the pairs that grew."""
    grown: set[int] = set()
    for wi, out, _hits in updates:
        f = freqs[wi]
        old_pairs = _pairs(seqs[wi])
        new_pairs = _pairs(out)
        for p in old_pairs:
            pair_count[p] -= f
        for p in new_pairs:
            pair_count[p] = pair_count.get(p, 0) + f
        old_set, new_set = set(old_pairs), set(new_pairs)
        for p in old_set - new_set:
            where[p].discard(wi)
        # Only pairs holding the new token can grow; they did not exist before this merge.
        for p in new_set - old_set:
            s = where.get(p)
            if s is None:
                where[p] = {wi}
            else:
                s.add(wi)
            grown.add(p)
        seqs[wi] = out
    return grown
