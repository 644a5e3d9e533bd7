"""The one parser of `NAME=VALUE` command-line options (`--data LANG=FILE`, `--tokenizer NAME=PATH`,
`--weights KEY=WEIGHT,...`, `--set FIELD=JSON_VALUE`)."""

from __future__ import annotations

from pathlib import Path

from vinasmol_core.common.errors import ConfigError


def split_pair(
    text: str, option: str, form: str = "NAME=PATH", *, empty_value: bool = False
) -> tuple[str, str]:
    """`NAME=VALUE` as (NAME, VALUE), split at the first '='. ConfigError naming the option and the
    expected form when there is no '=', the name is empty, or the value is (unless `empty_value`)."""
    name, sep, value = text.partition("=")
    if not sep or not name or not (value or empty_value):
        raise ConfigError(f"{option} {text!r}: expected {form}")
    return name, value


def path_pairs(values: list[str], option: str, form: str = "NAME=PATH") -> dict[str, list[Path]]:
    """Repeated `NAME=PATH` options; a name given twice collects several paths, in order."""
    out: dict[str, list[Path]] = {}
    for value in values:
        name, path = split_pair(value, option, form)
        out.setdefault(name, []).append(Path(path))
    return out
