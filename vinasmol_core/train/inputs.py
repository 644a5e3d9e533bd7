"""What a stage reads before it trains: the initial checkpoint and the dataset, fetched and checked
against the spec and each other (no Fabric, no weights loaded)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vinasmol_core.common.errors import ConfigError, VinaSmolError
from vinasmol_core.common.manifests import CheckpointManifest, DatasetManifest
from vinasmol_core.train import params, relora
from vinasmol_core.train.data import check_data_matches_checkpoint, eval_languages, open_sampler
from vinasmol_core.train.spec import StageJob, StageSpec

if TYPE_CHECKING:
    from vinasmol_core.store import ArtifactStore


@dataclass
class Inputs:
    """Everything fetched and checked before training starts."""

    init_digest: str
    dataset_digest: str
    ckpt_dir: Path
    dataset_dir: Path
    init_manifest: CheckpointManifest
    dataset_manifest: DatasetManifest
    config: Any  # litgpt.Config, with the stage's RoPE settings applied
    base_vocab_size: int | None
    languages: list[str] = field(default_factory=list)


def stage_config(ckpt_dir: Path, spec: StageSpec) -> Any:
    """The checkpoint's litgpt Config with the stage's RoPE base, adjustments and block size."""
    from litgpt import Config

    path = ckpt_dir / "model_config.yaml"
    if not path.is_file():
        raise VinaSmolError(f"the initial checkpoint has no model_config.yaml ({ckpt_dir})")
    config = Config.from_file(path)
    if spec.rope_base is not None:
        config.rope_base = int(spec.rope_base) if float(spec.rope_base).is_integer() else spec.rope_base
    if spec.rope_adjustments is not None:
        config.rope_adjustments = dict(spec.rope_adjustments)
    if spec.block_size is not None:
        config.block_size = spec.block_size
    return config


def check_model_fits(spec: StageSpec, config: Any) -> None:
    if spec.seq_len > config.block_size:
        raise ConfigError(
            f"stage {spec.name}: seq_len={spec.seq_len} is above the model's block_size={config.block_size} "
            f"(RoPE base {config.rope_base}, adjustments {config.rope_adjustments}); set block_size and "
            "rope settings in the stage spec to extend the context"
        )
    if config.rope_adjustments:
        from litgpt.model import GPT

        try:
            GPT.rope_cache(_RopeProbe(config, spec.seq_len))  # type: ignore[arg-type]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"stage {spec.name}: rope_adjustments {config.rope_adjustments}: {exc}"
            ) from None


class _RopeProbe:
    """Just enough of a GPT for `GPT.rope_cache` to validate rope_adjustments."""

    def __init__(self, config: Any, seq_len: int) -> None:
        self.config = config
        self.max_seq_length = seq_len


def _fetch_manifests(
    job: StageJob, store: ArtifactStore, init_digest: str, dataset_digest: str
) -> tuple[CheckpointManifest, DatasetManifest]:
    init_manifest = store.get_manifest(init_digest)
    if not isinstance(init_manifest, CheckpointManifest) or init_manifest.format != "litgpt":
        kind = getattr(init_manifest, "format", init_manifest.kind)
        raise ConfigError(
            f"init_checkpoint {job.init_checkpoint} is a {kind} artifact, not a litgpt checkpoint"
        )
    dataset_manifest = store.get_manifest(dataset_digest)
    if not isinstance(dataset_manifest, DatasetManifest):
        raise ConfigError(f"dataset {job.dataset} is a {dataset_manifest.kind} artifact, not a dataset")
    return init_manifest, dataset_manifest


def prepare_inputs(job: StageJob, store: ArtifactStore) -> Inputs:
    """Fetch the initial checkpoint and the dataset; check they fit the spec and each other."""
    spec = job.spec
    spec.check()
    init_digest = store.resolve(job.init_checkpoint)
    dataset_digest = store.resolve(job.dataset)
    init_manifest, dataset_manifest = _fetch_manifests(job, store, init_digest, dataset_digest)
    ckpt_dir = Path(store.fetch(init_digest))
    dataset_dir = Path(store.fetch(dataset_digest))
    config = stage_config(ckpt_dir, spec)
    check_model_fits(spec, config)
    check_data_matches_checkpoint(dataset_dir, ckpt_dir, dataset_manifest.tokenizer_digest, config.vocab_size)
    base_vocab = spec.base_vocab_size or params.find_base_vocab_size(ckpt_dir, init_manifest.extra)
    # the policy on a meta-device model: pattern errors before any tensor is loaded
    from litgpt.model import GPT

    with torch.device("meta"):
        probe = GPT(config)
        params.tie_embeddings(probe)
        params.apply_policy(probe, spec.trainable, base_vocab)
        if spec.relora is not None:  # and the ReLoRA targets
            relora.attach(probe, spec.relora, spec.seed)
    counts = dataset_manifest.token_counts
    available = {k[4:] for k, v in counts.items() if k.startswith("val/") and v > 0} or None
    return Inputs(
        init_digest=init_digest,
        dataset_digest=dataset_digest,
        ckpt_dir=ckpt_dir,
        dataset_dir=dataset_dir,
        init_manifest=init_manifest,
        dataset_manifest=dataset_manifest,
        config=config,
        base_vocab_size=base_vocab,
        languages=eval_languages(spec.mixture, spec.eval_languages, available),
    )


def validate_job(job: StageJob, store: ArtifactStore | None = None) -> Inputs:
    """Every check a stage makes before training, without starting it (no Fabric, no weights)."""
    from vinasmol_core.store import ArtifactStore

    inputs = prepare_inputs(job, store or ArtifactStore(job.store_url))
    open_sampler(
        inputs.dataset_dir,
        job.spec.mixture,
        job.spec.seq_len,
        seed=job.spec.seed,
        stage=job.spec.name,
        long_context=job.spec.long_context,
    ).sequence(0)
    return inputs
