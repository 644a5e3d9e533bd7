"""Conversation and instruction rows become plain-text documents (`vinasmol_core.data.documents`):
the template, the errors that name the field to fix, and the hub reader on a mirror of such rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vinasmol_core.common.errors import ConfigError, VinaSmolError
from vinasmol_core.data.documents import MessagesDocument, PromptResponseDocument, render
from vinasmol_core.data.readers import iter_hf_records
from vinasmol_core.data.spec import SourceSpec
from vinasmol_core.plan.hub_mirror import write_dataset_config
from vinasmol_core.plan.recipe import load_recipe

TINY = Path(__file__).resolve().parent.parent / "recipes" / "tiny-cpu.yaml"
TURNS = [{"role": "system", "content": "Bạn là trợ lý."}, {"role": "user", "content": " Xin chào? "},
         {"role": "assistant", "content": "Chào bạn!"}]


def test_turns_are_role_labelled_paragraphs_without_special_tokens() -> None:
    text = render({"messages": TURNS}, MessagesDocument(), "chat", "row 1")
    assert text == "System: Bạn là trợ lý.\n\nUser: Xin chào?\n\nAssistant: Chào bạn!"
    fmt = PromptResponseDocument(prompt="instruction", context="input", response="output")
    row = {"instruction": "Dịch sang tiếng Việt.", "input": "Good morning", "output": "Chào buổi sáng"}
    assert render(row, fmt, "alpaca", "row 1") == (
        "User: Dịch sang tiếng Việt.\n\nGood morning\n\nAssistant: Chào buổi sáng")
    empty_input = {"instruction": "Hi", "input": "", "output": "Hello"}
    assert render(empty_input, fmt, "a", "r") == "User: Hi\n\nAssistant: Hello"
    assert render({"messages": []}, MessagesDocument(), "chat", "row 1") is None  # nothing to train on


def test_bad_rows_name_the_field_to_fix() -> None:
    with pytest.raises(VinaSmolError, match=r"'chat': row 3 has no column 'messages' .*document.field"):
        render({"conversations": TURNS}, MessagesDocument(), "chat", "row 3")
    turns = [{"from": "human", "value": "Hỏi"}, {"from": "tool", "value": "x"}]
    fmt = MessagesDocument(field="c", role_key="from", content_key="value", labels={"human": "User"})
    with pytest.raises(VinaSmolError, match=r"row 3, turn 1: role 'tool' has no label .*document.labels"):
        render({"c": turns}, fmt, "chat", "row 3")
    with pytest.raises(VinaSmolError, match=r"turn 0 has no column 'role' .*document.role_key"):
        render({"messages": [{"from": "human", "value": "x"}]}, MessagesDocument(), "chat", "row 3")
    with pytest.raises(VinaSmolError, match=r"no column 'output' .*document.response"):
        render({"prompt": "x"}, PromptResponseDocument(response="output"), "alpaca", "row 3")
    with pytest.raises(VinaSmolError, match="column 'messages' is str, not a list of turns"):
        render({"messages": "User: hi"}, MessagesDocument(), "chat", "row 3")


def _recipe(tmp_path: Path, document: object, source: object | None = None) -> Path:
    data = yaml.safe_load(TINY.read_text())
    hub = {"kind": "hub", "dataset": "org/chat", "budget": {"documents": 9}}
    data["corpora"][3] = {"name": "vi-chat", "lang": "vi", "role": "annealing", "document": document,
                          "source": source or hub}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_recipe_errors_name_the_document_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"corpora.3.document.*kind"):
        load_recipe(_recipe(tmp_path, {"kind": "chatml"}))
    with pytest.raises(ConfigError, match=r"corpora.3.document.messages.rol_key"):
        load_recipe(_recipe(tmp_path, {"kind": "messages", "rol_key": "from"}))
    with pytest.raises(ConfigError, match=r"corpora.3.document.prompt-response.labels.*exactly the labels"):
        load_recipe(_recipe(tmp_path, {"kind": "prompt-response", "labels": {"user": "Q"}}))
    with pytest.raises(ConfigError, match=r"corpora.3.*document: .*need a hub source"):
        load_recipe(_recipe(tmp_path, {"kind": "messages"}, {"kind": "sample", "docs": 5}))
    recipe = load_recipe(_recipe(tmp_path, {"kind": "messages", "field": "conversations"}))
    assert recipe.corpora[3].document == MessagesDocument(field="conversations")


def test_the_hub_reader_renders_each_conversation_of_a_mirror(tmp_path: Path) -> None:
    folder = tmp_path / "org" / "chat"
    rows = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"Câu hỏi {i}?"},
                                              {"from": "gpt", "value": f"Trả lời {i}."}]} for i in range(5)]
    write_dataset_config(folder, None, {"train": rows})
    fmt = MessagesDocument(field="conversations", role_key="from", content_key="value",
                           labels={"human": "User", "gpt": "Assistant"})
    spec = SourceSpec(name="vi-chat", lang="vi", role="annealing", hf_dataset="org/chat", hf_path=str(folder),
                      document=fmt, max_docs=3)
    assert list(iter_hf_records(spec)) == [(f"c{i}", f"User: Câu hỏi {i}?\n\nAssistant: Trả lời {i}.")
                                           for i in range(3)]
