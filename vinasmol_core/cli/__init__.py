"""The library's commands (`vinasmol store|tokenizer|model|data|train|export|eval ...`), one module per
group; `flows.cli` adds the pipeline commands (run, demo) on top of these.

`app`, `run_app` and `main` live in `root` and load on first use, so that running one group alone
(`python -m vinasmol_core.cli.store ...`) imports only that group.
"""

from __future__ import annotations

from typing import Any

__all__ = ["app", "main", "run_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from vinasmol_core.cli import root

        return getattr(root, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
