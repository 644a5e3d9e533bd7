"""A run's planning and checks: the recipe and its overrides, the inputs a run needs (preflight), hub
revisions pinned at plan time, mirrors of a recipe's hub sources, smoke runs and proxy sweeps."""
