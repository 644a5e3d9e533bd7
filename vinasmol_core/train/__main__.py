"""`python -m vinasmol_core.train --job job.json [--metrics metrics.jsonl]`: run one stage."""

from vinasmol_core.common.process_exit import run_entry_point
from vinasmol_core.train.process import main

if __name__ == "__main__":
    run_entry_point(main)
