"""`vinasmol eval long` and `vinasmol eval harness` on a tiny model: tables printed, JSON written, and a
clear non-zero exit for a checkpoint too short for the length asked and for an unknown task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli_helpers import run_vinasmol
from vinasmol_core.builtin.sample_corpus import sample_texts
from vinasmol_core.builtin.tiny import build_tiny_base_model, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli-eval")
    tok = build_tiny_tokenizer(root / "tok", vocab_size=512)
    model = build_tiny_base_model(root / "model", tok, block_size=256)
    val = root / "code.jsonl"
    val.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts("code", 4)), encoding="utf-8")
    return model, val


def test_eval_long_prints_tables_and_writes_json(tiny, tmp_path, monkeypatch, capsys) -> None:  # noqa: ANN001
    model, val = tiny
    out = tmp_path / "long.json"
    code, stdout, err = run_vinasmol(
        monkeypatch, capsys, "eval", "long", str(model), "--data", f"code={val}", "--length", "128",
        "--passkey-lengths", "256", "--depths", "0,1", "--trials", "1", "--max-docs", "2", "--json", str(out),
    )
    assert code == 0, err
    assert "0-32 BPB" in stdout and "| code | 2 |" in stdout and "depth 0" in stdout
    report = json.loads(out.read_text())
    assert report["block_size"] == 256 and set(report["passkey"]["256"]) == {"0", "1"}


def test_eval_long_refuses_a_short_checkpoint(tiny, monkeypatch, capsys) -> None:  # noqa: ANN001
    model, val = tiny
    code, _, err = run_vinasmol(monkeypatch, capsys, "eval", "long", str(model), "--data", f"code={val}",
                                "--length", "512", "--passkey-lengths", "")
    assert code != 0
    assert "block size is 256 tokens, shorter than the 512 tokens" in err


def test_eval_harness_names_an_unknown_task(tiny, tmp_path, monkeypatch, capsys) -> None:  # noqa: ANN001
    from vinasmol_core.model.harness import write_choice_task

    items = [{"context": "a", "choices": ["b", "c"], "label": 0}] * 4
    write_choice_task(tmp_path / "tasks", "mini_task", items)
    code, stdout, err = run_vinasmol(monkeypatch, capsys, "eval", "harness", str(tiny[0]), "--tasks",
                                     "mini_task", "--include-path", str(tmp_path / "tasks"))
    assert code == 0, err
    assert "mini_task" in stdout and "n=4" in stdout
    code, _, err = run_vinasmol(monkeypatch, capsys, "eval", "harness", str(tiny[0]), "--tasks",
                                "mini_task,belebele_xx_Nope", "--include-path", str(tmp_path / "tasks"))
    assert code != 0 and "unknown harness task(s): belebele_xx_Nope" in err
