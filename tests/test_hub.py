"""Hub ids resolved to mirror folders, checks of a mirror and of the HF cache, the hub base model
fetched from a mirror by the fetch-base-model step. No network: HF_HUB_OFFLINE is set."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tasks import model as model_tasks
from tests.model_fixtures import shared_tiny
from vinasmol_core.errors import VinaSmolError
from vinasmol_core.hub import (
    MIRROR_ENV,
    check_dataset_mirror,
    check_dataset_online,
    check_model,
    fetch_model,
    mirror_configs,
    mirror_root,
)
from vinasmol_core.hub_mirror import write_dataset_config
from vinasmol_core.recipe import HubBase


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty HF cache
    monkeypatch.delenv(MIRROR_ENV, raising=False)


def test_mirror_root_from_option_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert mirror_root(None) is None
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path))
    assert mirror_root(None) == tmp_path.resolve()
    with pytest.raises(VinaSmolError, match=rf"hub mirror {tmp_path / 'nope'} is not a folder"):
        mirror_root(tmp_path / "nope")


def test_mirror_readme_declares_configs_and_splits(tmp_path: Path) -> None:
    folder = tmp_path / "org" / "ds"
    write_dataset_config(folder, "a", {"train": [{"text": "x"}], "test": [{"text": "y"}]})
    write_dataset_config(folder, None, {"train": [{"text": "z"}]})
    assert mirror_configs(folder) == {"a": ["train", "test"], "default": ["train"]}
    assert check_dataset_mirror("c", folder, "a", "test").status == "ok"
    assert check_dataset_mirror("c", folder, None, "train").status == "ok"
    bad = check_dataset_mirror("c", folder, "b", "train")
    assert bad.status == "missing" and "no config 'b' (configs: a, default)" in bad.detail
    assert "no split 'validation'" in check_dataset_mirror("c", folder, "a", "validation").detail
    assert check_dataset_mirror("c", tmp_path / "org" / "other", None, "train").status == "missing"


def test_offline_hub_checks_say_not_checked() -> None:
    check = check_dataset_online("corpus x", "org/ds", "cfg", "train", None)
    assert (check.status, check.detail) == ("offline", "not checked: offline (HF_HUB_OFFLINE is set)")
    model = check_model("base model", "org/model", "main", None)
    assert model.status == "offline" and "not in the HF cache" in model.detail


def test_offline_model_fetch_is_a_clear_error_naming_the_fix() -> None:
    with pytest.raises(VinaSmolError) as err:
        fetch_model("org/model", "main", ["*.json"], None)
    msg = str(err.value)
    assert msg.startswith("base model org/model @ main: cannot fetch it")
    assert "hf download org/model --revision main" in msg and "--hub-mirror" in msg


def test_the_base_model_step_reads_a_hub_model_from_the_mirror(tmp_path_factory, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = shared_tiny(tmp_path_factory)
    mirror = tmp_path / "mirror"
    shutil.copytree(tiny["base"], mirror / "org" / "tiny-model")
    assert check_model("base model", "org/tiny-model", "main", mirror).status == "ok"
    assert check_model("base model", "org/other", "main", mirror).status == "missing"
    monkeypatch.setenv("VINASMOL_CACHE", str(tmp_path / "cache"))
    store_url = f"file://{tmp_path / 'store'}"
    manifest = model_tasks.fetch_base_model.fn(
        source=HubBase(repo="org/tiny-model"), name="b", store_url=store_url, hub_mirror=str(mirror)
    )
    assert manifest.format == "hf" and "model.safetensors" in manifest.files
    direct = model_tasks.fetch_base_model.fn(
        source=model_tasks.HFBase(path=str(tiny["base"])), name="b", store_url=store_url
    )
    assert manifest.files["model.safetensors"].sha256 == direct.files["model.safetensors"].sha256
    with pytest.raises(VinaSmolError, match="base model org/other: not in the hub mirror"):
        model_tasks.fetch_base_model.fn(source=HubBase(repo="org/other"), name="b", store_url=store_url,
                                        hub_mirror=str(mirror))
