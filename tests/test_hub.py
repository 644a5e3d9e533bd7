"""Hub ids resolved to mirror folders, checks of a mirror and of the HF cache, the hub base model
fetched from a mirror by the fetch-base-model step. No network: HF_HUB_OFFLINE is set."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tasks import model as model_tasks
from tests.model_fixtures import shared_tiny
from vinasmol_core.common.errors import VinaSmolError
from vinasmol_core.hub import (
    MIRROR_ENV,
    check_dataset_mirror,
    check_dataset_online,
    check_model,
    fetch_model,
    mirror_configs,
    mirror_root,
)
from vinasmol_core.plan.hub_mirror import write_dataset_config
from vinasmol_core.plan.hub_revisions import pin_corpus, pin_hub_revisions
from vinasmol_core.plan.recipe import CorpusSpec, HubBase, parse_recipe

TINY = Path(__file__).resolve().parent.parent / "recipes" / "tiny-cpu.yaml"


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


# ----------------------------------------------------------------------------- revisions and digests
def _hub_corpus(**source: object) -> CorpusSpec:
    fields = {"kind": "hub", "dataset": "acme/corpus", "budget": {"documents": 10}, **source}
    return CorpusSpec(name="web", lang="en", source=fields)


def test_a_hub_corpus_at_a_branch_is_pinned_to_the_commit_the_hf_cache_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    from tasks.common import corpus_digest

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.chdir(tmp_path)
    refs = tmp_path / "hub-cache" / "datasets--acme--corpus" / "refs"
    refs.mkdir(parents=True)
    digests = []
    for commit in ("1" * 40, "2" * 40):  # upstream moved `main` between two runs
        (refs / "main").write_text(commit)
        pinned, line = pin_corpus(_hub_corpus(), None)
        assert pinned.source.revision == commit
        assert line == f"corpus web: acme/corpus @ main is commit {commit} (HF cache); read and keyed at it"
        digests.append(corpus_digest(pinned))
    assert digests[0] != digests[1]
    assert pin_corpus(_hub_corpus(revision="3" * 40), None)[0].source.revision == "3" * 40  # already pinned
    # a mirror is keyed on its content; a revision nothing resolves is refused, or kept when not strict
    mirrored = _hub_corpus(revision="v1")
    assert pin_corpus(mirrored, tmp_path)[0] == mirrored
    with pytest.raises(VinaSmolError, match=r"corpus web: cannot resolve acme/corpus @ v1 to a commit .*"
                                            r"pin source.revision to a full commit hash"):
        pin_corpus(mirrored, None)
    assert pin_corpus(mirrored, None, strict=False)[0] == mirrored


def test_online_the_commit_is_the_one_the_preflight_check_was_told(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from huggingface_hub import HfApi, constants

    from vinasmol_core import hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_HUB_COMMITS", {})
    asked: list[tuple[str, str | None]] = []

    def dataset_info(self: HfApi, repo_id: str, revision: str | None = None, **kwargs: object) -> object:
        asked.append((repo_id, revision))
        return SimpleNamespace(sha="a" * 40, card_data=None)

    monkeypatch.setattr(HfApi, "dataset_info", dataset_info)
    assert check_dataset_online("corpus web", "acme/corpus", None, "train", None).status == "ok"
    data = yaml.safe_load(TINY.read_text())
    data["corpora"].append(_hub_corpus().model_dump(mode="json"))
    recipe = parse_recipe(data, "test")
    pinned, lines = pin_hub_revisions(recipe, None)
    assert pinned.corpora[-1].source.revision == "a" * 40 and asked == [("acme/corpus", None)]
    assert lines == [f"corpus web: acme/corpus @ main is commit {'a' * 40} (hub); read and keyed at it"]
    assert pinned.corpora[:-1] == recipe.corpora[:-1]  # corpora not on the hub are left as they are
    assert recipe.corpora[-1].source.revision is None  # the recipe itself is unchanged
    pin_hub_revisions(recipe, None)  # a later plan asks the hub again (upstream may have moved)
    assert asked == [("acme/corpus", None), ("acme/corpus", "main")]


def test_a_mirror_folder_is_hashed_once_until_a_file_changes(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.common import corpus_digest
    from vinasmol_core import hub

    folder = tmp_path / "acme" / "corpus"
    write_dataset_config(folder, None, {"train": [{"id": str(i), "text": f"doc {i}"} for i in range(30)]},
                         shard_rows=10)
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert len(files) == 4  # README.md and three shards
    hashed: list[Path] = []
    real = hub._file_sha256

    def counting(path: Path) -> str:
        hashed.append(path)
        return real(path)

    monkeypatch.setattr(hub, "_file_sha256", counting)
    monkeypatch.setattr(hub, "_FOLDER_DIGESTS", {})
    first = {corpus_digest(_hub_corpus(), str(tmp_path)) for _ in range(10)}
    assert len(first) == 1 and len(hashed) == len(files)  # one pass over the mirror, not ten
    write_dataset_config(folder, None, {"train": [{"id": "x", "text": "changed"}]})
    second = corpus_digest(_hub_corpus(), str(tmp_path))
    assert second not in first and len(hashed) == len(files) + 2  # the changed files, read again


def test_the_download_hint_includes_the_files_of_the_config() -> None:
    from fnmatch import fnmatch

    from vinasmol_core.hub import _card_configs, dataset_help, include_patterns

    def fetched(repo: str, config: str, path: str) -> bool:
        return any(fnmatch(path, p) for p in include_patterns(repo, config))

    # the layouts of the shipped recipe's datasets (from their dataset cards)
    assert fetched("HuggingFaceFW/fineweb-edu", "sample-10BT", "sample/10BT/000_00000.parquet")
    assert not fetched("HuggingFaceFW/fineweb-edu", "sample-10BT", "sample/100BT/000_00000.parquet")
    assert fetched("HuggingFaceFW/fineweb-2", "vie_Latn", "data/vie_Latn/train/000_00000.parquet")
    assert fetched("wikimedia/wikipedia", "20231101.vi", "20231101.vi/train-00000-of-00002.parquet")
    assert fetched("HuggingFaceTB/finemath", "finemath-4plus", "finemath-4plus/train-00000-of-00064.parquet")
    assert "--include README.md '*sample-10BT*' '*sample/10BT/*'" in dataset_help(
        "HuggingFaceFW/fineweb-edu", "sample-10BT", None)
    # once the hub was asked, the card's own paths
    card = {"configs": [{"config_name": "cfg", "data_files": [{"split": "train", "path": "x/y/*"}]}]}
    assert _card_configs(card, "org/known") == {"cfg": ["train"]}
    assert "--include README.md 'x/y/*' --local-dir" in dataset_help("org/known", "cfg", None)
