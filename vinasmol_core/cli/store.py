"""`vinasmol store ...` commands: ls, show, verify, gc.

Every command takes `--store URL` (default: $VINASMOL_STORE, else the file:// store under the user's data
folder). S3 credentials and endpoint come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta

import typer
from rich.console import Console
from rich.table import Table

from vinasmol_core.common.errors import StoreError, VinaSmolError
from vinasmol_core.store import ArtifactStore, validate_ref

app = typer.Typer(
    no_args_is_help=True,
    help="Inspect and maintain the artifact store (refs, manifests, blobs).",
    pretty_exceptions_enable=False,
)

StoreOpt = typer.Option(
    None, "--store", help="store URL (default: $VINASMOL_STORE, else the local default store)"
)


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _open(url: str | None) -> ArtifactStore:
    return ArtifactStore(url)


@app.command("ls")
def ls_cmd(
    store: str | None = StoreOpt,
    prefix: str = typer.Option("", "--prefix", help="only refs whose name starts with this"),
    manifests: bool = typer.Option(False, "--manifests", help="list every manifest, not only refs"),
) -> None:
    """List refs (or every manifest) with kind, name, size and creation time."""
    st = _open(store)
    console = Console(width=160)
    if manifests:
        digests = st.list_manifests()
        table = Table("digest", "kind", "name", "files", "size", "created", title=f"manifests in {st.url}")
        for d in digests:
            m = st.get_manifest(d)
            size = sum(e.size for e in m.files.values())
            table.add_row(d[:16], m.kind, m.name, str(len(m.files)), _human(size), m.created.isoformat())
        console.print(table if digests else f"no manifests in {st.url}")
        return
    refs = st.list_refs(prefix)
    if not refs:
        console.print(f"no refs{' under ' + repr(prefix) if prefix else ''} in {st.url}")
        return
    table = Table("ref", "digest", "kind", "name", "files", "size", "created", title=f"refs in {st.url}")
    for name, d in refs.items():
        try:
            m = st.get_manifest(d)
            size = _human(sum(e.size for e in m.files.values()))
            table.add_row(name, d[:16], m.kind, m.name, str(len(m.files)), size, m.created.isoformat())
        except StoreError as exc:
            table.add_row(name, d[:16], "?", f"[red]{exc}[/red]", "", "", "")
    console.print(table)


@app.command("show")
def show_cmd(
    ref_or_digest: str = typer.Argument(..., help="a ref (runs/<run>/<step>), a digest or a unique prefix"),
    store: str | None = StoreOpt,
    as_json: bool = typer.Option(False, "--json", help="print only the manifest JSON"),
) -> None:
    """Show one manifest (and, for a ref, every move of the ref)."""
    st = _open(store)
    digest = st.resolve(ref_or_digest)
    m = st.get_manifest(digest)
    doc = json.loads(m.canonical_json())
    if as_json:
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return
    print(f"digest: {digest}")
    print(json.dumps(doc, indent=2, ensure_ascii=False))
    try:
        validate_ref(ref_or_digest)
        is_ref = ref_or_digest != digest and ref_or_digest in st.list_refs(ref_or_digest)
    except StoreError:
        is_ref = False
    if is_ref:
        print(f"history of ref {ref_or_digest}:")
        for move in st.ref_history(ref_or_digest):
            print(f"  {move.time.isoformat()}  {move.digest or '(deleted)'}")


@app.command("verify")
def verify_cmd(
    store: str | None = StoreOpt,
    quick: bool = typer.Option(False, "--quick", help="check presence and size only, do not hash blobs"),
    repair: bool = typer.Option(
        False, "--repair", help="delete corrupt blobs: re-running the step that made them uploads them again"
    ),
) -> None:
    """Check every manifest, its blobs (present, size, sha256) and every ref. Exit 1 on any problem."""
    st = _open(store)
    report = st.verify(hashes=not quick, repair=repair)
    print(
        f"{st.url}: {report.manifests} manifests, {report.blobs} blobs"
        + ("" if quick else f" ({_human(report.bytes_hashed)} hashed)")
        + f", {report.refs} refs"
    )
    for problem in report.problems:
        print(f"  problem: {problem}")
    for sha in report.removed:
        print(f"  removed corrupt blob {sha}")
    if report.removed:
        print("re-run the steps of the artifacts named above with --force to publish their files again")
    if not report.ok:
        raise StoreError(f"store {st.url} has {len(report.problems)} problem(s)")
    print("ok")


@app.command("gc")
def gc_cmd(
    store: str | None = StoreOpt,
    grace_hours: float = typer.Option(
        24.0, "--grace-hours", min=0.0, help="keep unreferenced blobs younger than this"
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="report what would be deleted"),
) -> None:
    """Delete blobs no manifest names (older than the grace period) and stale partial uploads."""
    st = _open(store)
    report = st.gc(grace=timedelta(hours=grace_hours), dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    print(
        f"{st.url}: {report.blobs_total} blobs; "
        f"{verb} {report.blobs_deleted} ({_human(report.bytes_deleted)}); "
        f"kept {report.blobs_kept_recent} unreferenced younger than {grace_hours:g} h; "
        f"{verb} {report.stale_uploads_removed} stale partial uploads"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the store commands alone (`python -m vinasmol_core.cli.store ls ...`); returns the exit status."""
    try:
        app(args=argv, standalone_mode=False)
    except VinaSmolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        return 1
    except Exception as exc:
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
