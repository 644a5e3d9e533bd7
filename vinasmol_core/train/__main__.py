"""`python -m vinasmol_core.train --job job.json [--metrics metrics.jsonl]`: run one stage."""

import sys

from vinasmol_core.train.process import main

if __name__ == "__main__":
    sys.exit(main())
