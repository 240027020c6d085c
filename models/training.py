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
    check_top_level,
    check_value,
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
    check_top_level(cfg, TOP_LEVEL_KEYS)
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # interpolation / resolver errors carry the useful message
        raise ConfigError(f"could not resolve the config: {err}") from err
    check_kwargs(cfg.data, target_of(cfg.data), "data")
    check_kwargs(cfg.model, target_of(cfg.model), "model")
    check_kwargs(cfg.trainer, L.Trainer.__init__, "trainer", ignore=("logger", "callbacks"))
    check_value(container["seed"], "seed", int)
    check_value(container["nan_check_every"], "nan_check_every", int, minimum=1)
    check_value(container["progress_refresh_rate"], "progress_refresh_rate", int, minimum=0)
    if cfg.get("logger"):
        check_kwargs(cfg.logger, target_of(cfg.logger), "logger")
    for key, cls in (("flow", FlowConfig), ("optim", OptimConfig), ("ema", EMAConfig)):
        build_dataclass(cls, cfg.get(key), key)
    check_kwargs(cfg.samples, SampleGrid.__init__, "samples", ignore=("out_dir",))
    check_kwargs(cfg.checkpoint, _checkpoint_callbacks, "checkpoint", ignore=("dirpath",))
    _check_text_setup(cfg)
    container.pop("hydra", None)
    return container


def _check_accelerator(trainer: dict[str, Any]) -> None:
    """trainer=gpu / ddp / fsdp / multinode on a machine without a visible GPU: say so before Lightning does."""
    import torch

    accelerator = str(trainer.get("accelerator", "auto")).lower()
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} but no CUDA device is visible on this machine: use trainer=cpu "
            "(or trainer.accelerator=cpu; DDP on CPU: trainer=ddp trainer.accelerator=cpu trainer.devices=2)"
        )


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
    from models.callbacks import CheckpointAtFractions, StepCheckpoint

    callbacks: list[Any] = [
        StepCheckpoint(
            dirpath=dirpath,
            filename="step_{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=every_n_steps,
            save_top_k=-1,
            save_last=save_last,
            save_on_train_epoch_end=False,
            enable_version_counter=False,  # last.ckpt is always last.ckpt (never last-v1.ckpt): resume reads it
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
    _check_accelerator(container["trainer"])  # here, not in validate: configs may be checked on a login node

    import lightning as L
    from hydra.utils import instantiate

    # The EMA copy is deliberately in eval mode; Lightning's generic warning about it is noise.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    logging.getLogger("lightning.pytorch").propagate = False  # Lightning prints its own lines once

    from models.preemption import GracefulStop
    from models.rectified_flow import EMAConfig, FlowConfig, OptimConfig, RectifiedFlowModule

    run_dir = Path(cfg.run_dir).resolve()
    ckpt_path = find_resume_checkpoint(run_dir, cfg.resume)
    resume_step = saved = None
    if ckpt_path is not None:
        from models.checkpoints import read_checkpoint

        saved = read_checkpoint(ckpt_path, what="resume", mmap=True)  # a broken file: one line naming it
        resume_step = saved.get("global_step")
        changed = flat_diff(saved.get("config") or {}, container)
        log.info("resuming %s from %s (step %s)", run_dir, ckpt_path, resume_step)
        if changed:
            log.warning("config differs from the checkpoint's:\n  %s", "\n  ".join(changed))
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
    if saved is not None:
        _check_resume_fits(module, saved, ckpt_path)
        del saved
    loggers = [instantiate(cfg.logger)] if cfg.get("logger") else []
    for logger in loggers:
        if hasattr(logger, "resume_from"):  # the CSV logger: rows after the checkpoint are logged again
            # no checkpoint (an attempt killed before its first one): every earlier row is logged again
            logger.resume_from(resume_step if resume_step is not None else 0)
    # nested `_target_` nodes (e.g. trainer.strategy for FSDP) become objects
    trainer_kwargs = instantiate(OmegaConf.to_container(cfg.trainer, resolve=True), _convert_="all")
    plugins = _plugins(trainer_kwargs.pop("plugins", None))
    # SIGTERM / SIGINT / SIGUSR1: finish the step, save last.ckpt, requeue under SLURM (USR1), stop
    stop = GracefulStop(None if cfg.trainer.get("fast_dev_run") else run_dir / "checkpoints" / "last.ckpt")
    trainer = L.Trainer(
        **trainer_kwargs,
        plugins=plugins,
        logger=loggers or False,
        callbacks=[*build_callbacks(cfg, run_dir), *datamodule.callbacks(), stop],  # stop: after the checkpoints
        default_root_dir=str(run_dir),
    )
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %s, %.2fM parameters; run dir: %s", type(model).__name__, n_params / 1e6, run_dir)
    with stop.handling_signals():
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


def _check_resume_fits(module: Any, saved: dict[str, Any], path: Path) -> None:
    """The checkpoint to resume holds weights of this model's sizes; else say which sizes differ (a
    run folder reused with other model settings) instead of Lightning's wall of mismatched keys."""
    from models.checkpoints import describe_mismatch

    stored = saved.get("state_dict") or {}
    ours = module.state_dict()
    if set(stored) == set(ours) and all(stored[k].shape == v.shape for k, v in ours.items()):
        return
    strip = lambda sd: {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
    mismatch = describe_mismatch(strip(ours), strip(stored))
    raise ConfigError(
        f"resume: {path} holds another model than the configured one ({mismatch}). "
        "This run folder was trained with other model settings: use name=<new name> for a new run, or the model "
        "settings of its config.yaml to continue it"
    )


def _plugins(given: Any) -> list[Any]:
    """The Trainer's plugins: the user's (trainer.plugins), plus the atomic checkpoint writer and, under SLURM,
    Lightning's SLURM environment with its auto-requeue off (it saves inside the signal handler, which can hang
    a multi-rank job: models/preemption.py stops and requeues instead)."""
    from lightning.fabric.plugins import CheckpointIO
    from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment, TorchElasticEnvironment

    from models.checkpoint_io import AtomicCheckpointIO

    plugins = list(given) if isinstance(given, list | tuple) else ([given] if given is not None else [])
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    environment = next((p for p in plugins if isinstance(p, ClusterEnvironment)), None)
    if environment is None and not TorchElasticEnvironment.detect() and SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))  # Lightning's choice of environment, minus the requeue
    elif isinstance(environment, SLURMEnvironment):
        environment.auto_requeue = False
    return plugins


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
