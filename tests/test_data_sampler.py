"""MixtureSampler: proportions, determinism, resume, rank disjointness, stages, long-context view."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.data_fixtures import long_short_corpus, mixture_dataset, tiny_tokenizer
from vinasmol_core.data import (
    LongContextSpec,
    MixtureSampler,
    PrepareSettings,
    SourceSpec,
    prepare_dataset,
    validation_sequences,
)
from vinasmol_core.data.sampler import FeistelPermutation
from vinasmol_core.data.shards import SourceTokens

MIX = {"vi": 0.55, "en": 0.40, "code": 0.05}


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mixture_dataset(tmp_path_factory)


def test_feistel_is_a_permutation() -> None:
    for n in (1, 2, 7, 1000, 4097):
        perm = FeistelPermutation(n, key=12345)
        assert sorted(perm(i) for i in range(n)) == list(range(n))
    p1, p2 = FeistelPermutation(1000, 1), FeistelPermutation(1000, 2)
    assert [p1(i) for i in range(20)] != [p2(i) for i in range(20)]


def test_mixture_proportions_within_one_percent(ds: Path) -> None:
    sampler = MixtureSampler(ds, MIX, 16, seed=3, stage="eeve-3")
    counts = Counter(sampler.locate(i)[0] for i in range(10_000))
    for lang, weight in MIX.items():
        assert abs(counts[f"sample-{lang}"] / 10_000 - weight) < 0.01, counts
    assert "vi-best" not in counts  # annealing data stays out of the main mixture


def test_sequence_is_pure_and_matches_the_stream(ds: Path) -> None:
    a = MixtureSampler(ds, MIX, 16, seed=1, stage="s")
    b = MixtureSampler(ds, MIX, 16, seed=1, stage="s")
    idx = [0, 1, 4095, 4096, 9_999, 123_456, 7]
    for i in idx:
        seq = a.sequence(i)
        assert seq.dtype == np.int64 and seq.shape == (17,)
        assert np.array_equal(seq, b.sequence(i))
    # sequence(i) is exactly the tokens at the located window of the source's stream
    meta_sources = {s.name: s for s in a.sources}
    for i in idx:
        name, offset, _ = a.locate(i)
        stream: SourceTokens = meta_sources[name].stream
        assert np.array_equal(a.sequence(i), stream.read(offset, 17))


def test_resume_from_a_step_matches_uninterrupted(ds: Path) -> None:
    full = MixtureSampler(ds, MIX, 16, seed=0, stage="eeve-6").stream(4, rank=1, world_size=2)
    batches = [next(full) for _ in range(12)]
    first = MixtureSampler(ds, MIX, 16, seed=0, stage="eeve-6").stream(4, rank=1, world_size=2)
    for _ in range(5):
        next(first)
    state = first.state_dict()
    assert set(state) == {"next_index", "rank", "world_size"}  # a few integers
    resumed = MixtureSampler(ds, MIX, 16, seed=0, stage="eeve-6").stream(4, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for k in range(5, 12):
        assert np.array_equal(next(resumed), batches[k])
    sampler = MixtureSampler(ds, MIX, 16, seed=0, stage="eeve-6")
    assert np.array_equal(sampler.batch(7, 4, rank=1, world_size=2), batches[7])


def test_two_ranks_never_share_a_sequence(ds: Path) -> None:
    sampler = MixtureSampler(ds, MIX, 16, seed=0, stage="eeve-4")
    windows = {s.name: s.n_windows for s in sampler.sources}
    n = 2 * min(windows.values())  # within one pass over every source
    r0 = {sampler.locate(i)[:2] for i in range(0, n, 2)}
    r1 = {sampler.locate(i)[:2] for i in range(1, n, 2)}
    assert len(r0) == len(range(0, n, 2)) and len(r1) == len(range(1, n, 2))
    assert not r0 & r1
    # together the two ranks' streams are exactly the single-process order, interleaved
    rank0 = sampler.stream(3, rank=0, world_size=2)
    rank1 = sampler.stream(3, rank=1, world_size=2)
    single = sampler.stream(6)
    for _ in range(4):
        a, b, both = next(rank0), next(rank1), next(single)
        assert np.array_equal(both[0::2], a) and np.array_equal(both[1::2], b)


def test_stages_draw_different_data(ds: Path) -> None:
    s3 = MixtureSampler(ds, MIX, 16, seed=0, stage="eeve-3")
    s4 = MixtureSampler(ds, MIX, 16, seed=0, stage="eeve-4")
    b3, b4 = s3.batch(0, 8), s4.batch(0, 8)
    assert not np.array_equal(b3, b4)
    assert not {r.tobytes() for r in b3} & {r.tobytes() for r in b4}
    same = MixtureSampler(ds, MIX, 16, seed=0, stage="eeve-3")  # unless asked: same stage key
    assert np.array_equal(same.batch(0, 8), b3)


def test_annealing_mixture_keys(ds: Path) -> None:
    weights = {"vi": 0.32, "en": 0.25, "code": 0.03, "annealing": 0.40}
    sampler = MixtureSampler(ds, weights, 16, seed=0, stage="annealing")
    counts = Counter(sampler.locate(i)[0] for i in range(8192))
    assert abs(counts["vi-best"] / 8192 - 0.40) < 0.01 and abs(counts["sample-vi"] / 8192 - 0.32) < 0.01
    by_name = MixtureSampler(ds, {"vi-best": 1.0, "sample-en": 1.0}, 16)
    assert {by_name.locate(i)[0] for i in range(200)} == {"vi-best", "sample-en"}


def test_validation_split_and_sequences(ds: Path) -> None:
    val = MixtureSampler(ds, {"vi": 1.0}, 16, split="val")
    train = MixtureSampler(ds, {"vi": 1.0}, 16)
    assert val.sources[0].stream.n_tokens < train.sources[0].stream.n_tokens
    seqs = list(validation_sequences(ds, "vi", 16, max_sequences=5))
    assert len(seqs) == 5 and all(s.shape == (17,) for s in seqs)
    assert np.array_equal(seqs[1][0], seqs[0][-1])  # consecutive windows share one token


def test_long_document_upsampling_factor(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    tok = tiny_tokenizer(tmp_path_factory)
    src = SourceSpec(name="books", lang="en", paths=(str(long_short_corpus(tmp_path_factory)),))
    ds = tmp_path / "ds"
    prepare_dataset([src], tok, ds, PrepareSettings(val_fraction=0.0, workers=0))
    seq_len = 32
    plain = MixtureSampler(ds, {"en": 1.0}, seq_len, stage="ctx")
    factor = 3.0
    long = MixtureSampler(ds, {"en": 1.0}, seq_len, stage="ctx",
                          long_context=LongContextSpec(factor=factor, min_doc_tokens=4 * seq_len))
    s = long.sources[0]
    n_long, n_all = s.long_windows.size, s.n_windows
    assert 0 < n_long < n_all and s.n_extra == round((factor - 1) * n_long)
    long_starts = {s.shift + int(w) * seq_len for w in s.long_windows}

    def long_fraction(sampler: MixtureSampler, draws: int) -> float:
        return sum(sampler.locate(i)[1] in long_starts for i in range(draws)) / draws

    # over one full pass, long windows are drawn exactly `factor` times as often as short ones
    draws = s.domain
    got = long_fraction(long, draws) * draws
    assert got == pytest.approx(factor * n_long, abs=1)
    per_long, per_short = got / n_long, (draws - got) / (n_all - n_long)
    assert per_long / per_short == pytest.approx(factor, rel=0.01)
    assert plain.sources[0].n_extra == 0
    assert long_fraction(plain, plain.sources[0].n_windows) == pytest.approx(n_long / n_all, abs=1e-9)


def test_resume_under_another_world_size_skips_and_repeats_nothing(ds: Path) -> None:
    """Two ranks consume indices 0..19, the run resumes on four: they continue at 20, 21, 22, 23, ..."""
    sampler = MixtureSampler(ds, MIX, 16, seed=0, stage="eeve-6")
    old = [sampler.stream(2, rank=r, world_size=2) for r in range(2)]
    for stream in old:
        for _ in range(5):
            next(stream)
    for saved in (old[0].state_dict(), old[1].state_dict()):
        new = [sampler.stream(2, rank=r, world_size=4) for r in range(4)]
        for stream in new:
            stream.load_state_dict(saved)
        assert sorted(stream.next_index for stream in new) == [20, 21, 22, 23]
        got = {next(stream)[0].tobytes() for stream in new}
        assert got == {sampler.sequence(i).tobytes() for i in (20, 21, 22, 23)}


def test_every_positive_weight_gets_sequences(ds: Path) -> None:
    counts = MixtureSampler._block_counts(np.array([0.9999, 0.0001]), 4096)
    assert counts.tolist() == [4095, 1]
    assert MixtureSampler._block_counts(np.array([0.55, 0.40, 0.05]), 4096).tolist() == [2253, 1638, 205]
    sampler = MixtureSampler(ds, {"vi": 0.9999, "en": 0.0001}, 16, seed=0, stage="s")
    drawn = Counter(sampler.locate(i)[0] for i in range(4096))
    assert drawn["sample-en"] == 1
    mix = sampler.effective_mixture()
    assert mix["sample-en"]["effective"] == 1 / 4096
    assert abs(mix["sample-en"]["requested"] - 0.0001) < 1e-12
    [warning] = sampler.mixture_warnings()
    assert "sample-en" in warning and "0.0001" in warning
    assert MixtureSampler(ds, MIX, 16, seed=0, stage="s").mixture_warnings() == []
