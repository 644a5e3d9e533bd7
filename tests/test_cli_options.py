"""The shared NAME=VALUE option parser of the command line."""

from pathlib import Path

import pytest

from vinasmol_core.cli.options import path_pairs, split_pair
from vinasmol_core.common.errors import ConfigError


def test_split_pair_splits_at_the_first_equals_sign() -> None:
    assert split_pair("vi=a=b.jsonl", "--data") == ("vi", "a=b.jsonl")
    assert split_pair("lr=", "--set", "FIELD=VALUE", empty_value=True) == ("lr", "")


@pytest.mark.parametrize("text", ["vi", "=a.jsonl", "vi="])
def test_split_pair_names_the_option_and_the_form(text: str) -> None:
    with pytest.raises(ConfigError, match=r"--data .*expected LANG=FILE"):
        split_pair(text, "--data", "LANG=FILE")


def test_path_pairs_collects_repeated_names_in_order() -> None:
    got = path_pairs(["vi=a", "en=b", "vi=c"], "--data")
    assert got == {"vi": [Path("a"), Path("c")], "en": [Path("b")]}
