"""Training stages on litgpt's GPT with Lightning Fabric: EEVE stages 3, 4, 6, 7, continued
pre-training, context extension and annealing, with exact freezing and resume to the step.

Light imports only: torch, litgpt and Lightning load when a stage runs.
"""

from vinasmol_core.train.spec import PRESETS, StageJob, StageSpec, load_job, parse_spec, preset

__all__ = [
    "PRESETS",
    "StageJob",
    "StageSpec",
    "load_job",
    "parse_spec",
    "preset",
    "run_stage",
    "run_stage_process",
    "validate_job",
]


def __getattr__(name: str):  # lazy: keep `import vinasmol_core.train` cheap
    if name == "run_stage_process":
        from vinasmol_core.train.process import run_stage_process

        return run_stage_process
    if name == "run_stage":
        from vinasmol_core.train.engine import run_stage

        return run_stage
    if name == "validate_job":
        from vinasmol_core.train.inputs import validate_job

        return validate_job
    raise AttributeError(name)
