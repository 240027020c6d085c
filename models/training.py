"""Assemble and run a training job from the composed Hydra config (the body of `train.py`)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from models.runtime import (
    ConfigError,
    build_dataclass,
    check_kwargs,
    check_missing,
    find_resume_checkpoint,
    flat_diff,
    register_resolvers,
    save_resolved_config,
    target_of,
)

log = logging.getLogger("erg.train")

# Top-level keys of configs/train.yaml (anything else at the top level is a typo).
TOP_LEVEL_KEYS = {
    "data", "model", "trainer", "logger", "experiment", "debug", "name", "seed", "run_dir", "resume",
    "compile", "nan_check_every", "progress_refresh_rate", "flow", "optim", "ema", "checkpoint",
    "samples", "hydra", "task", "text_encoder",
}  # fmt: skip


def validate(cfg: DictConfig) -> dict[str, Any]:
    """Check the whole config before anything heavy runs; return it resolved as plain containers."""
    import lightning as L

    from models.callbacks import SampleGrid
    from models.rectified_flow import EMAConfig, FlowConfig, OptimConfig

    register_resolvers()
    check_missing(cfg)
    unknown = [k for k in cfg if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise ConfigError(f"unknown top-level config key(s): {unknown}; valid: {sorted(TOP_LEVEL_KEYS)}")
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # interpolation / resolver errors carry the useful message
        raise ConfigError(f"could not resolve the config: {err}") from err
    check_kwargs(cfg.data, target_of(cfg.data), "data")
    check_kwargs(cfg.model, target_of(cfg.model), "model")
    check_kwargs(cfg.trainer, L.Trainer.__init__, "trainer", ignore=("logger", "callbacks"))
    if cfg.get("logger"):
        check_kwargs(cfg.logger, target_of(cfg.logger), "logger")
    for key, cls in (("flow", FlowConfig), ("optim", OptimConfig), ("ema", EMAConfig)):
        build_dataclass(cls, cfg.get(key), key)
    check_kwargs(cfg.samples, SampleGrid.__init__, "samples", ignore=("out_dir",))
    check_kwargs(cfg.checkpoint, _checkpoint_callbacks, "checkpoint", ignore=("dirpath",))
    _check_text_setup(cfg)
    container.pop("hydra", None)
    return container


def _check_text_setup(cfg: DictConfig) -> None:
    """A text-conditioned model (it takes `context_dim`, e.g. the MMDiT) needs a text encoder, and a text
    encoder needs such a model and prompts for its sample grids."""
    if str(cfg.model.get("_target_", "")).startswith("erg.integrations."):
        raise ConfigError(
            f"this model config ({cfg.model._target_}) is a public model through diffusers, for sampling with ERG "
            "(sample.py model=<that config> ...); train.py trains this repo's models (model=mmdit_sd3_d24: SD3's size)"
        )
    text = cfg.get("text_encoder")
    takes_text = "context_dim" in cfg.model
    if text:
        check_kwargs(text, target_of(text), "text_encoder")
    if takes_text and not text:
        raise ConfigError(
            f"model {cfg.model.get('arch') or cfg.model._target_} is text-conditioned (model.context_dim): choose "
            "its text encoders, e.g. text_encoder=llama3_t5 (the paper's) or text_encoder=minilm (offline)"
        )
    if cfg.data.get("text_embeddings") and not text:
        raise ConfigError(
            "data.text_embeddings reads cached text encodings, but no text_encoder is set: name the text encoders "
            "the cache was written with (e.g. text_encoder=llama3_t5), or drop data.text_embeddings"
        )
    if text and not takes_text:
        raise ConfigError(
            "text_encoder is set but the model takes no text (no model.context_dim): use a text-to-image model "
            "(model=mmdit_b2, ...) or drop text_encoder"
        )
    if text and cfg.samples.every_n_steps and not cfg.samples.get("prompts"):
        raise ConfigError(
            "samples.prompts: a text-to-image run draws its sample grids from prompts; give a few, e.g. "
            "'samples.prompts=[a photo of a cat,a red bus]', or turn the grids off with samples.every_n_steps=0"
        )


def _checkpoint_callbacks(
    dirpath: Path, every_n_steps: int = 1000, save_last: bool = True, at_fractions: list[float] | None = None
) -> list[Any]:
    """step_<n>.ckpt every `every_n_steps` (+ last.ckpt), and at the given fractions of training (e.g.
    1/16: AutoGuidance's weak model)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from models.callbacks import CheckpointAtFractions

    callbacks: list[Any] = [
        ModelCheckpoint(
            dirpath=dirpath,
            filename="step_{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=every_n_steps,
            save_top_k=-1,
            save_last=save_last,
            save_on_train_epoch_end=False,
        )
    ]
    if at_fractions:
        callbacks.append(CheckpointAtFractions(dirpath, list(at_fractions), every_n_steps))
    return callbacks


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[Any]:
    from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar

    from models.callbacks import SampleGrid

    callbacks: list[Any] = []
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(TQDMProgressBar(refresh_rate=cfg.progress_refresh_rate))
    if not cfg.trainer.get("fast_dev_run"):  # a smoke run writes nothing
        callbacks += _checkpoint_callbacks(run_dir / "checkpoints", **cfg.checkpoint)
        callbacks.append(SampleGrid(out_dir=run_dir / "samples", **cfg.samples))
    if cfg.get("logger"):
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return callbacks


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train; returns a summary (run dir, last checkpoint, final step)."""
    container = validate(cfg)

    import lightning as L
    import torch
    from hydra.utils import instantiate

    # The EMA copy is deliberately in eval mode; Lightning's generic warning about it is noise.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    logging.getLogger("lightning.pytorch").propagate = False  # Lightning prints its own lines once

    from models.rectified_flow import EMAConfig, FlowConfig, OptimConfig, RectifiedFlowModule

    run_dir = Path(cfg.run_dir).resolve()
    ckpt_path = find_resume_checkpoint(run_dir, cfg.resume)
    resume_step = None
    if ckpt_path is not None:
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        resume_step = saved.get("global_step")
        changed = flat_diff(saved.get("config") or {}, container)
        log.info("resuming %s from %s (step %s)", run_dir, ckpt_path, resume_step)
        if changed:
            log.warning("config differs from the checkpoint's:\n  %s", "\n  ".join(changed))
        del saved
    save_resolved_config(container, run_dir, resume_step)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = _instantiate_data(cfg.data)
    model = instantiate(cfg.model)
    text_encoder = _instantiate_text_encoder(cfg, model)
    module = RectifiedFlowModule(
        model,
        flow=build_dataclass(FlowConfig, cfg.flow, "flow"),
        optim=build_dataclass(OptimConfig, cfg.optim, "optim"),
        ema=build_dataclass(EMAConfig, cfg.ema, "ema"),
        seed=cfg.seed,
        compile=cfg.compile,
        nan_check_every=cfg.nan_check_every,
        config=container,
        text_encoder=text_encoder,
    )
    loggers = [instantiate(cfg.logger)] if cfg.get("logger") else False
    trainer = L.Trainer(
        # nested `_target_` nodes (e.g. trainer.strategy for FSDP) become objects
        **instantiate(OmegaConf.to_container(cfg.trainer, resolve=True), _convert_="all"),
        logger=loggers,
        callbacks=build_callbacks(cfg, run_dir) + datamodule.callbacks(),
        default_root_dir=str(run_dir),
    )
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %s, %.2fM parameters; run dir: %s", type(model).__name__, n_params / 1e6, run_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    summary = {
        "run_dir": str(run_dir),
        "step": trainer.global_step,
        "last_checkpoint": str(last) if last.is_file() else None,
        "samples": str(run_dir / "samples"),
        "train_loss": _metric(trainer, "train/loss"),
        "val_loss": _metric(trainer, "val/loss"),
    }
    return summary


def _instantiate_data(node: DictConfig) -> Any:
    """The DataModule; its own config errors (missing shards, mismatched latents) surface as they
    are instead of wrapped in Hydra's InstantiationException, so train.py prints them plainly."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError | FileNotFoundError):
            raise err.__cause__ from None
        raise


def _instantiate_text_encoder(cfg: DictConfig, model: Any) -> Any:
    """The frozen text encoders (None without text); their widths must be the model's."""
    if not cfg.get("text_encoder"):
        return None
    from hydra.utils import instantiate

    from data.text_embeddings import CachedTextConditioner, resolve_folder

    cache = resolve_folder(cfg.data.get("text_embeddings"), cfg.data.get("shards"))
    try:
        if cache is not None:  # cached embeddings: the stack from the cache, no encoder weights loaded
            encoder = CachedTextConditioner(cache, OmegaConf.to_container(cfg.text_encoder, resolve=True))
        else:
            encoder = instantiate(cfg.text_encoder)
    except ConfigError:
        raise
    except Exception as err:  # missing weights folders, declared widths that do not match: say so plainly
        cause = err.__cause__ if err.__cause__ is not None else err
        raise ConfigError(f"text_encoder: {cause}") from err
    if cache is not None and cfg.samples.every_n_steps:
        missing = [p for p in cfg.samples.get("prompts") or [] if p not in encoder.prompts]
        if missing:
            raise ConfigError(
                f"samples.prompts {missing[:3]} are not in the cached text embeddings ({cache}), and a run on cached "
                "embeddings loads no text encoder: pass them to scripts/precompute_text_embeddings.py --prompt, "
                "or turn the sample grids off with samples.every_n_steps=0"
            )
    for key in ("context_dim", "pooled_dim"):
        if getattr(model, key) != getattr(encoder, key):
            raise ConfigError(
                f"model.{key}={getattr(model, key)} but the text encoders give {getattr(encoder, key)}: "
                f"set model.{key}=${{text_encoder.{key}}} (the model configs of this repo do)"
            )
    return encoder


def _metric(trainer: Any, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return float(value) if value is not None else None
