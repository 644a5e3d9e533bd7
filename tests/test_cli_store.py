"""`vinasmol store ls | show | verify | gc`: output on a real store, exit 1 with a clear message on errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vinasmol_core.cli.store import main
from vinasmol_core.common.manifests import DatasetManifest
from vinasmol_core.store import ArtifactStore

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def filled(tmp_path: Path) -> tuple[ArtifactStore, str]:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("hello")
    (src / "sub" / "b.bin").write_bytes(os.urandom(3000))
    store = ArtifactStore((tmp_path / "store").as_uri(), cache_dir=tmp_path / "cache")
    m = store.publish(DatasetManifest(name="corpus"), src, ref="runs/r1/data")
    store.set_ref("latest/data", m.digest)
    return store, m.digest


def test_ls_show_verify_gc(filled, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    store, digest = filled
    assert main(["ls", "--store", store.url]) == 0
    out = capsys.readouterr().out
    assert "runs/r1/data" in out and "latest/data" in out and digest[:16] in out and "corpus" in out
    assert main(["ls", "--store", store.url, "--manifests"]) == 0
    assert digest[:16] in capsys.readouterr().out
    assert main(["show", "runs/r1/data", "--store", store.url]) == 0
    out = capsys.readouterr().out
    assert digest in out and "sub/b.bin" in out and "history of ref runs/r1/data" in out
    assert main(["show", digest[:12], "--store", store.url, "--json"]) == 0
    assert '"name": "corpus"' in capsys.readouterr().out
    assert main(["verify", "--store", store.url]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["gc", "--store", store.url, "--grace-hours", "0"]) == 0
    assert "deleted 0" in capsys.readouterr().out


def test_store_url_defaults_to_environment(filled, capsys, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    store, digest = filled
    monkeypatch.setenv("VINASMOL_STORE", store.url)
    assert main(["ls"]) == 0
    assert "runs/r1/data" in capsys.readouterr().out


def test_errors_exit_non_zero_with_a_clear_message(filled, capsys, tmp_path: Path) -> None:  # noqa: ANN001
    store, digest = filled
    assert main(["show", "runs/r1/missing", "--store", store.url]) == 1
    assert "error: no ref or manifest named 'runs/r1/missing'" in capsys.readouterr().err
    assert main(["show", "../etc", "--store", store.url]) == 1
    assert "'../etc'" in capsys.readouterr().err
    assert main(["ls", "--store", "nope://x"]) == 1
    assert "unknown store URL scheme 'nope'" in capsys.readouterr().err
    # a corrupt blob makes verify fail
    entry = store.get_manifest(digest).files["sub/b.bin"]
    blob = Path(store.url[len("file://") :]) / "blobs" / entry.sha256[:2] / entry.sha256
    os.chmod(blob, 0o644)
    blob.write_bytes(b"x" * entry.size)
    assert main(["verify", "--store", store.url]) == 1
    captured = capsys.readouterr()
    assert "sub/b.bin" in captured.out and "1 problem" in captured.err
    assert main(["verify", "--repair", "--store", store.url]) == 1
    assert f"removed corrupt blob {entry.sha256}" in capsys.readouterr().out and not blob.exists()
    missing = tmp_path / "never-created"
    assert main(["ls", "--store", missing.as_uri()]) == 0
    assert not missing.exists()


def test_module_entry_point_exit_status(filled, tmp_path: Path) -> None:  # noqa: ANN001
    store, _ = filled
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    bad = subprocess.run(
        [sys.executable, "-m", "vinasmol_core.cli.store", "show", "runs/none", "--store", store.url],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert bad.returncode == 1 and "error: no ref or manifest named 'runs/none'" in bad.stderr
    assert "Traceback" not in bad.stderr
