"""Hugging Face hub sources: where a hub dataset or model is read from, whether it can be, and how to
make it readable offline.

A hub mirror is a local folder laid out like the hub itself: `<mirror>/<owner>/<name>/` holds what
`hf download <owner>/<name> --local-dir <mirror>/<owner>/<name>` would put there (for a dataset:
parquet or JSONL shards and a README.md whose YAML front matter lists the `configs:`; for a model:
config.json, safetensors and tokenizer files). The readers call the same
`datasets.load_dataset(location, config, split=..., streaming=True)` and the same model loading on
either; only `location` differs.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vinasmol_core.common.errors import VinaSmolError

MIRROR_ENV = "VINASMOL_HUB_MIRROR"
TIMEOUT_S = 10.0
_TRUE = {"1", "true", "yes", "on"}


def mirror_root(explicit: str | Path | None = None) -> Path | None:
    """The hub mirror folder: `explicit` (--hub-mirror), else $VINASMOL_HUB_MIRROR, else None."""
    value = str(explicit) if explicit else os.environ.get(MIRROR_ENV, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise VinaSmolError(f"hub mirror {path} is not a folder (from --hub-mirror or ${MIRROR_ENV})")
    return path.resolve()


def mirror_dir(mirror: Path, repo: str) -> Path:
    """Where a hub repository lives in a mirror: `<mirror>/<owner>/<name>`."""
    return mirror / repo


def hub_offline() -> bool:
    """Whether the hub client is told not to use the network (HF_HUB_OFFLINE)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return True
    return bool(constants.HF_HUB_OFFLINE)


@dataclass(frozen=True)
class HubCheck:
    """What one check of a hub source found. `status`: ok, offline (not reachable, not checked),
    missing (not in the mirror or the cache) or unknown (the hub does not know the id, revision,
    config or split)."""

    label: str
    status: str
    detail: str

    @property
    def line(self) -> str:
        return f"{self.label}: {self.detail}"


def describe_dataset(repo: str, config: str | None, split: str, revision: str | None) -> str:
    parts = [repo] + ([f"config {config}"] if config else []) + [f"split {split}"]
    return ", ".join(parts) + (f" @ {revision}" if revision else "")


# (repo, config name) -> the data file patterns its dataset card lists, as the hub answered
_CARD_PATHS: dict[tuple[str, str], list[str]] = {}


def include_patterns(repo: str, config: str | None) -> list[str]:
    """`hf download --include` patterns that fetch one configuration's data files: the paths its
    dataset card lists (once the hub was asked), else the config's name anywhere in a path, and, for
    a name with dashes, the folder layout many cards use for it (`sample-10BT`: `sample/10BT/*`)."""
    if not config:
        return []
    known = _CARD_PATHS.get((repo, config))
    if known:
        return known
    patterns = [f"*{config}*"]
    if "-" in config:
        patterns.append(f"*{config.replace('-', '/')}/*")
    return patterns


def dataset_help(repo: str, config: str | None, revision: str | None) -> str:
    """How to make a hub dataset readable without the network."""
    rev = f" --revision {revision}" if revision else ""
    patterns = include_patterns(repo, config)
    include = " --include README.md " + " ".join(f"'{p}'" for p in patterns) if patterns else ""
    return (
        f"pre-download it into a hub mirror with `hf download {repo} --repo-type dataset{rev}{include} "
        f"--local-dir MIRROR/{repo}` (the whole configuration: streaming from the hub reads only the "
        f"budget) and pass --hub-mirror MIRROR (or set ${MIRROR_ENV}); bench/hub_mirror.py builds a "
        "mirror from local JSONL files"
    )


def model_help(repo: str, revision: str) -> str:
    """How to make a hub model readable without the network."""
    return (
        f"pre-download it with `hf download {repo} --revision {revision}` and set HF_HUB_OFFLINE=1 "
        f"(it is then read from the HF cache), or put it in a hub mirror with `hf download {repo} "
        f"--revision {revision} --local-dir MIRROR/{repo}` and pass --hub-mirror MIRROR "
        f"(or set ${MIRROR_ENV})"
    )


# ----------------------------------------------------------------------------- datasets
def mirror_configs(folder: Path) -> dict[str, list[str]]:
    """The `configs:` of a dataset folder's README.md front matter: config name -> split names
    (an empty dict when the README declares none)."""
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    text = readme.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return {}
    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except (yaml.YAMLError, IndexError) as exc:
        raise VinaSmolError(f"{readme}: the YAML front matter is not valid ({exc})") from None
    out: dict[str, list[str]] = {}
    for entry in meta.get("configs") or []:
        files = entry.get("data_files") or []
        if isinstance(files, list) and files and all(isinstance(f, dict) for f in files):
            splits = [str(f.get("split", "train")) for f in files]
        else:  # a path or a list of paths: one train split
            splits = ["train"]
        out[str(entry.get("config_name", "default"))] = splits
    return out


def check_dataset_mirror(label: str, folder: Path, config: str | None, split: str) -> HubCheck:
    if not folder.is_dir():
        return HubCheck(label, "missing", f"not in the hub mirror: {folder} does not exist")
    configs = mirror_configs(folder)
    if configs:
        name = config or "default"
        if name not in configs:
            return HubCheck(label, "missing", f"the mirror {folder} has no config {name!r} "
                                              f"(configs: {', '.join(sorted(configs))})")
        if split not in configs[name]:
            return HubCheck(label, "missing", f"the mirror {folder} config {name!r} has no split {split!r} "
                                              f"(splits: {', '.join(configs[name])})")
    elif config is not None:
        return HubCheck(label, "missing", f"the mirror {folder} has no README.md listing configs "
                                          f"(config {config!r} asked)")
    return HubCheck(label, "ok", f"in the hub mirror ({folder})")


def _card_configs(card: Any, repo: str = "") -> dict[str, list[str]] | None:
    entries = (card or {}).get("configs") if isinstance(card, dict) else getattr(card, "configs", None)
    if not entries:
        return None
    out: dict[str, list[str]] = {}
    for entry in entries:
        files = entry.get("data_files") or []
        items = [files] if isinstance(files, str) else files
        paths = [f if isinstance(f, str) else f.get("path") for f in items]
        flat = [str(q) for p in paths for q in (p if isinstance(p, list) else [p]) if q]
        if repo and flat:
            _CARD_PATHS[(repo, str(entry.get("config_name", "default")))] = flat
        splits = [str(f.get("split", "train")) for f in files if isinstance(f, dict)] or ["train"]
        out[str(entry.get("config_name", "default"))] = splits
    return out


def check_dataset_online(label: str, repo: str, config: str | None, split: str,
                         revision: str | None) -> HubCheck:
    """Ask the hub whether the dataset (and, where its card lists them, the config and split) exists."""
    if hub_offline():
        return HubCheck(label, "offline", "not checked: offline (HF_HUB_OFFLINE is set)")
    from huggingface_hub import HfApi

    try:
        info = HfApi().dataset_info(repo, revision=revision, timeout=TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - network and hub errors come in many types
        return _classify(label, "dataset", repo, exc)
    if info.sha:
        _HUB_COMMITS[(repo, revision or "main")] = info.sha
    configs = _card_configs(info.card_data.to_dict() if info.card_data is not None else None, repo)
    where = f"on the hub ({repo} @ {info.sha or revision or 'main'})"
    if configs is None:
        return HubCheck(label, "ok", f"{where}; config and split not checked (the card lists no configs)")
    name = config or "default"
    if name not in configs:
        known = ", ".join(sorted(configs)[:20])
        return HubCheck(label, "unknown", f"{repo} has no config {name!r} (configs: {known})")
    if split not in configs[name]:
        return HubCheck(label, "unknown", f"{repo} config {name!r} has no split {split!r} "
                                          f"(splits: {', '.join(configs[name])})")
    return HubCheck(label, "ok", where)


def _classify(label: str, kind: str, repo: str, exc: Exception) -> HubCheck:
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        return HubCheck(label, "unknown", f"{repo} is gated: accept its terms on the hub, then "
                                          "`hf auth login`")
    if isinstance(exc, errors.RevisionNotFoundError):
        return HubCheck(label, "unknown", f"{repo}: unknown revision ({exc})")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return HubCheck(label, "unknown", f"no {kind} {repo!r} on the hub (or it is private)")
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return HubCheck(label, "offline", f"not checked: offline ({first})")


def dataset_location(repo: str, mirror: Path | None) -> str:
    """What `load_dataset` is given: the mirror folder, or the hub id."""
    return str(mirror_dir(mirror, repo)) if mirror is not None else repo


_FolderSig = tuple[tuple[str, int, int, int], ...]
_FOLDER_DIGESTS: dict[str, tuple[_FolderSig, str]] = {}


def _visible_files(folder: Path) -> list[tuple[str, Path]]:
    """(relative path, path) of the files under `folder`, sorted; hidden files and folders (such as
    `.cache` of `hf download`) left out."""
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if not any(part.startswith(".") for part in rel.split("/")):
            out.append((rel, path))
    return out


def _file_sha256(path: Path) -> str:
    fh = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            fh.update(chunk)
    return fh.hexdigest()


def folder_digest(folder: Path) -> str:
    """sha256 over the relative paths and contents of every file under `folder` (hidden files and
    folders left out). Remembered per folder while no file's size, mtime or inode changes, so a
    mirror is read once per process, not once per call."""
    files = _visible_files(folder)
    sig: _FolderSig = tuple(
        (rel, st.st_size, st.st_mtime_ns, st.st_ino) for rel, st in ((rel, p.stat()) for rel, p in files)
    )
    key = str(folder.resolve())
    known = _FOLDER_DIGESTS.get(key)
    if known is not None and known[0] == sig:
        return known[1]
    h = hashlib.sha256()
    for rel, path in files:
        h.update(f"{rel}\0{_file_sha256(path)}\n".encode())
    digest = h.hexdigest()
    _FOLDER_DIGESTS[key] = (sig, digest)
    return digest


# ----------------------------------------------------------------------------- revisions
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_HUB_COMMITS: dict[tuple[str, str], str] = {}  # (repo, revision) -> commit the last check was told


def hub_cache_commit(repo: str, revision: str, repo_type: str = "dataset") -> str | None:
    """The commit a revision of a hub repository points at in the HF cache (`refs/<revision>`)."""
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo.replace('/', '--')}" / "refs" / revision
    try:
        commit = ref.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return commit if _COMMIT.match(commit) else None


def resolve_dataset_revision(repo: str, revision: str | None) -> tuple[str | None, str]:
    """The commit hash a hub dataset's revision (a branch or tag; None: main) points at now, and where
    that was learned: `pinned` (already a commit), `hub` (asked online; the preflight check's answer
    when it asked), `HF cache` (offline: the cache's ref), or None and `unresolved`."""
    rev = revision or "main"
    if _COMMIT.match(rev):
        return rev, "pinned"
    told = _HUB_COMMITS.pop((repo, rev), None)  # used once: a later plan asks again
    if told is not None:
        return told, "hub"
    if not hub_offline():
        from huggingface_hub import HfApi

        try:
            sha = HfApi().dataset_info(repo, revision=rev, timeout=TIMEOUT_S).sha
        except Exception:  # noqa: BLE001 - network and hub errors come in many types
            sha = None
        if sha:
            return sha, "hub"
    cached = hub_cache_commit(repo, rev)
    if cached is not None:
        return cached, "HF cache"
    return None, "unresolved"


# ----------------------------------------------------------------------------- models
def check_model(label: str, repo: str, revision: str, mirror: Path | None, network: bool = True) -> HubCheck:
    """Whether the model can be read: from the mirror, from the HF cache when offline, or from the hub."""
    if mirror is not None:
        folder = mirror_dir(mirror, repo)
        if not (folder / "config.json").is_file():
            return HubCheck(label, "missing", f"not in the hub mirror: {folder}/config.json does not exist")
        return HubCheck(label, "ok", f"in the hub mirror ({folder})")
    if hub_offline() or not network:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo, "config.json", revision=revision)
        if isinstance(cached, str):
            return HubCheck(label, "ok", f"in the HF cache ({Path(cached).parent})")
        return HubCheck(label, "offline", "not checked: offline, and not in the HF cache")
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo, revision=revision, timeout=TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001
        return _classify(label, "model", repo, exc)
    return HubCheck(label, "ok", f"on the hub ({repo} @ {info.sha or revision})")


def fetch_model(repo: str, revision: str, allow_patterns: list[str], mirror: Path | None) -> Path:
    """A local folder holding the model: its mirror folder, or its snapshot in the HF cache
    (downloaded there with `snapshot_download` unless HF_HUB_OFFLINE is set)."""
    if mirror is not None:
        folder = mirror_dir(mirror, repo)
        if not folder.is_dir():
            raise VinaSmolError(f"base model {repo}: not in the hub mirror ({folder} does not exist)")
        return folder
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id=repo, revision=revision, allow_patterns=allow_patterns,
                                 local_files_only=hub_offline())
    except Exception as exc:  # noqa: BLE001 - network and hub errors come in many types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VinaSmolError(f"base model {repo} @ {revision}: cannot fetch it ({first}); "
                            f"{model_help(repo, revision)}") from None
    return Path(path)
