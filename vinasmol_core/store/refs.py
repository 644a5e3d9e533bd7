"""Refs: small named pointers at manifests (`refs/<name>.json`), and the history of their moves
(`ref-history/<name>/<ns>-<digest>`)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

from vinasmol_core.common.errors import StoreError
from vinasmol_core.store.backends.base import _Backend
from vinasmol_core.store.layout import _HEX64, _HISTORY_ENTRY, _ref_key
from vinasmol_core.store.reports import RefMove


def parse_ref(backend: _Backend, name: str, data: bytes) -> str:
    """The digest the body of ref `name` holds (StoreError if it holds none)."""
    try:
        digest = json.loads(data)["digest"]
    except (ValueError, KeyError, TypeError):
        raise StoreError(f"ref {name!r} in store {backend.url} is unreadable") from None
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise StoreError(f"ref {name!r} in store {backend.url} holds no valid digest")
    return digest


def read_ref(backend: _Backend, name: str) -> str | None:
    data = backend.read(_ref_key(name))
    if data is None:
        return None
    return parse_ref(backend, name, data)


def move_ref(backend: _Backend, ref: str, digest: str | None) -> None:
    """Write (or delete) the ref, then record what it holds now. Of concurrent movers, each stamps its
    entry after its own write and reads the ref after stamping, so the newest entry names the ref's
    final target (a mover that lost the race records the winner's target)."""
    if digest is None:
        backend.delete(_ref_key(ref))
    else:
        body = json.dumps({"digest": digest, "updated": datetime.now(UTC).isoformat()}).encode()
        backend.write(_ref_key(ref), body)
    stamp = f"{time.time_ns():020d}"
    now = read_ref(backend, ref)
    backend.write(f"ref-history/{ref}/{stamp}-{now or 'deleted'}", b"")


def list_refs(backend: _Backend, prefix: str = "") -> dict[str, str]:
    """{ref name: digest} for every ref whose name starts with `prefix`."""
    names = []
    for obj in backend.list("refs"):
        if not obj.key.endswith(".json"):
            continue
        name = obj.key[len("refs/") : -len(".json")]
        if name.startswith(prefix):
            names.append(name)
    data = backend.read_many([_ref_key(n) for n in names])
    out: dict[str, str] = {}
    for n in sorted(names):
        raw = data.get(_ref_key(n))
        if raw is not None:
            out[n] = parse_ref(backend, n, raw)
    return out


def ref_history(backend: _Backend, ref: str) -> list[RefMove]:
    """Every move of `ref` (a valid ref name), oldest first."""
    moves = []
    base = f"ref-history/{ref}/"
    for obj in backend.list(f"ref-history/{ref}"):
        rest = obj.key[len(base) :]
        m = _HISTORY_ENTRY.match(rest)
        if m is None:
            continue  # a deeper ref's history
        ns, digest = int(m.group(1)), m.group(2)
        when = datetime.fromtimestamp(ns / 1e9, UTC)
        moves.append(RefMove(ref, None if digest == "deleted" else digest, when))
    return sorted(moves, key=lambda mv: mv.time)
