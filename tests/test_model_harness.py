"""lm-evaluation-harness over local task files: a tiny model trained on word pairs scores above chance
on a multiple-choice task about those pairs, and at chance once the labels are shuffled; a litgpt
checkpoint reaches the harness through the export (unknown task names: tests/test_cli_model.py)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from vinasmol_core.builtin.tiny import build_tiny_base_model, build_tiny_tokenizer
from vinasmol_core.model.harness import cloze_items, run_harness, write_choice_task

WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "garden", "window",
         "rocket", "candle", "forest", "silver"]


def _train_pairs(model_dir: Path, pairs: dict[str, str], steps: int = 120) -> None:
    """Fit the tiny model to texts "w partner." for every word, in a random order each step."""
    import torch
    from transformers import AutoModelForCausalLM

    from vinasmol_core.model.embeddings import load_tokenizer

    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    rng = random.Random(0)
    eot = tok.token_to_id("<|endoftext|>")
    model.train()
    for _ in range(steps):
        words = rng.sample(list(pairs), len(pairs))
        batch = torch.tensor([[eot] + tok.encode(" ".join(f"{w} {pairs[w]}." for w in words)).ids])
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(model_dir)


@dataclass
class Trained:
    model: Path
    pairs: dict[str, str]

    def items(self, shuffled: bool) -> list[dict]:
        """Context: a word; choices: its partner and three other words; shuffled: a random label."""
        rng = random.Random(1)
        items = []
        for _ in range(3):
            for w in self.pairs:
                others = rng.sample([v for v in self.pairs if v != self.pairs[w]], 3)
                choices = [self.pairs[w], *others]
                rng.shuffle(choices)
                label = rng.randrange(4) if shuffled else choices.index(self.pairs[w])
                items.append({"context": w, "choices": choices, "label": label})
        return items


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("harness")
    tok = build_tiny_tokenizer(root / "tok", vocab_size=400)
    model = build_tiny_base_model(root / "model", tok, block_size=128)
    pairs = dict(zip(WORDS, WORDS[1:] + WORDS[:1], strict=True))  # each word is followed by its partner
    _train_pairs(model, pairs)
    return Trained(model, pairs)


def test_local_task_above_chance_and_shuffled_at_chance(trained: Trained, tmp_path: Path) -> None:
    write_choice_task(tmp_path / "tasks", "pairs_easy", trained.items(shuffled=False))
    write_choice_task(tmp_path / "tasks", "pairs_shuffled", trained.items(shuffled=True))
    scores = run_harness(trained.model, ["pairs_easy", "pairs_shuffled"], include_path=tmp_path / "tasks")
    assert scores["pairs_easy"]["n"] == 36
    assert scores["pairs_easy"]["acc"] >= 0.8  # chance is 0.25
    assert 0.05 <= scores["pairs_shuffled"]["acc"] <= 0.45


def test_a_launchers_environment_does_not_make_the_harness_distributed(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`vinasmol run` started where a launcher (torchrun, SLURM, a Lightning strategy) left its
    variables: the harness still evaluates in its one process, and the variables are back after."""
    import os

    launcher = {"WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511",
                "TORCHELASTIC_RUN_ID": "stray"}
    for key, value in launcher.items():
        monkeypatch.setenv(key, value)
    write_choice_task(tmp_path / "tasks", "pairs_easy", trained.items(shuffled=False))
    scores = run_harness(trained.model, ["pairs_easy"], include_path=tmp_path / "tasks", limit=4)
    assert scores["pairs_easy"]["n"] == 4
    assert {k: os.environ.get(k) for k in launcher} == launcher


def test_litgpt_checkpoint_goes_through_the_export(trained: Trained, tmp_path: Path) -> None:
    from vinasmol_core.model import hf_to_litgpt

    lit = hf_to_litgpt(trained.model, tmp_path / "lit")
    write_choice_task(tmp_path / "tasks", "pairs_easy", trained.items(shuffled=False))
    on_lit = run_harness(lit, ["pairs_easy"], include_path=tmp_path / "tasks", limit=12)
    on_hf = run_harness(trained.model, ["pairs_easy"], include_path=tmp_path / "tasks", limit=12)
    assert on_lit["pairs_easy"]["n"] == 12
    assert on_lit["pairs_easy"]["acc"] == pytest.approx(on_hf["pairs_easy"]["acc"])


def test_cloze_items_hold_the_true_next_sentence() -> None:
    docs = [f"Doc {d} opens here today. It goes on with point {d} now. It ends with fact {d} then."
            for d in range(10)]
    items = cloze_items(docs, 8, seed=3)
    assert len(items) == 8
    for item in items:
        assert len(set(item["choices"])) == 4
        doc = next(d for d in docs if d.startswith(item["context"]) or item["context"] in d)
        assert (item["context"] + " " + item["choices"][item["label"]]) in doc
    assert len({item["label"] for item in items}) > 1
