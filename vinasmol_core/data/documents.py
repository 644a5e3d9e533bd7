"""Conversation and instruction rows rendered as plain-text documents (annealing data in the way of
SmolLM2's: instruction and dialogue sets beside textbooks).

A corpus's `document` says how a row becomes one training document:

* `messages`: a column holding a list of turns, each a mapping with a role and a content
  (`[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]`);
* `prompt-response`: a prompt column and a response column, optionally a context column (appended
  to the prompt after a blank line, as Alpaca's `input`) and a system column.

The template (`render`) is plain text that the base tokenizer reads like any other text, with no
chat special tokens: one paragraph per turn, `<Label>: <content>`, turns separated by a blank line,
the labels `System`, `User` and `Assistant` by default (`labels` maps each role of the data to its
label). For example:

    User: Viết một câu về Hà Nội.

    Assistant: Hà Nội là thủ đô của Việt Nam.

A role that `labels` does not name, a missing column or a turn that is not a mapping with text is a
`VinaSmolError` naming the source, the row and the field to fix.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vinasmol_core.common.errors import VinaSmolError

DEFAULT_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}
TURN_SEPARATOR = "\n\n"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _labels_ok(labels: dict[str, str]) -> dict[str, str]:
    bad = [role for role, label in labels.items() if not label.strip() or "\n" in label]
    if bad:
        raise ValueError(f"the labels of {', '.join(bad)} must be one line of text")
    return labels


class MessagesDocument(_Strict):
    """A row's `field` is a list of turns `{role_key: ..., content_key: ...}`."""

    kind: Literal["messages"] = "messages"
    field: str = Field(default="messages", min_length=1, description="column holding the list of turns")
    role_key: str = Field(default="role", min_length=1, description="key of a turn's role")
    content_key: str = Field(default="content", min_length=1, description="key of a turn's text")
    labels: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_LABELS), min_length=1,
                                   description="role in the data -> label written before its turns")

    @field_validator("labels")
    @classmethod
    def _one_line_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        return _labels_ok(labels)

    def columns(self) -> list[str]:
        return [self.field]


class PromptResponseDocument(_Strict):
    """A row's `prompt` and `response` columns (and `context`, `system` when named)."""

    kind: Literal["prompt-response"] = "prompt-response"
    prompt: str = Field(default="prompt", min_length=1, description="column of the user's turn")
    response: str = Field(default="response", min_length=1, description="column of the assistant's turn")
    context: str | None = Field(default=None, description="column appended to the prompt (e.g. `input`)")
    system: str | None = Field(default=None, description="column of a system turn written first")
    labels: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_LABELS),
                                   description="label of the system, user and assistant turns")

    @field_validator("labels")
    @classmethod
    def _three_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        missing = [r for r in DEFAULT_LABELS if r not in labels]
        if missing or set(labels) - set(DEFAULT_LABELS):
            raise ValueError(f"give exactly the labels of {', '.join(DEFAULT_LABELS)}")
        return _labels_ok(labels)

    def columns(self) -> list[str]:
        return [c for c in (self.system, self.prompt, self.context, self.response) if c]


DocumentFormat = Annotated[MessagesDocument | PromptResponseDocument, Field(discriminator="kind")]


def _turn(label: str, text: str) -> str:
    return f"{label}: {text.strip()}"


def _column(record: dict[str, Any], name: str, source: str, where: str, what: str) -> Any:
    if name not in record:
        fields = ", ".join(sorted(map(str, record))[:10])
        raise VinaSmolError(f"source {source!r}: {where} has no column {name!r} (fields: {fields}); set "
                            f"the corpus's document.{what} to one of them")
    return record[name]


def _text(value: Any, source: str, where: str, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise VinaSmolError(f"source {source!r}: {where}: {what} is {type(value).__name__}, not text")
    return value


def render(record: dict[str, Any], fmt: MessagesDocument | PromptResponseDocument, source: str,
           where: str) -> str | None:
    """One row as a plain-text document (see the module docstring); None when it has no text."""
    turns: list[str] = []
    if isinstance(fmt, MessagesDocument):
        messages = _column(record, fmt.field, source, where, "field")
        if messages is None:
            return None
        if not isinstance(messages, list):
            raise VinaSmolError(f"source {source!r}: {where}: column {fmt.field!r} is "
                                f"{type(messages).__name__}, not a list of turns")
        for i, turn in enumerate(messages):
            at = f"{where}, turn {i}"
            if not isinstance(turn, dict):
                raise VinaSmolError(f"source {source!r}: {at} is {type(turn).__name__}, not a mapping")
            role = _column(turn, fmt.role_key, source, at, "role_key")
            content = _text(_column(turn, fmt.content_key, source, at, "content_key"), source, at,
                            f"{fmt.content_key!r}")
            if role not in fmt.labels:
                raise VinaSmolError(f"source {source!r}: {at}: role {role!r} has no label (labels: "
                                    f"{', '.join(fmt.labels)}); add it to the corpus's document.labels")
            if content.strip():
                turns.append(_turn(fmt.labels[role], content))
    else:
        system = _text(_column(record, fmt.system, source, where, "system"), source, where,
                       f"column {fmt.system!r}") if fmt.system else ""
        prompt = _text(_column(record, fmt.prompt, source, where, "prompt"), source, where,
                       f"column {fmt.prompt!r}")
        context = _text(_column(record, fmt.context, source, where, "context"), source, where,
                        f"column {fmt.context!r}") if fmt.context else ""
        response = _text(_column(record, fmt.response, source, where, "response"), source, where,
                         f"column {fmt.response!r}")
        if system.strip():
            turns.append(_turn(fmt.labels["system"], system))
        user = TURN_SEPARATOR.join(t.strip() for t in (prompt, context) if t.strip())
        if user:
            turns.append(_turn(fmt.labels["user"], user))
        if response.strip():
            turns.append(_turn(fmt.labels["assistant"], response))
    return TURN_SEPARATOR.join(turns) or None
