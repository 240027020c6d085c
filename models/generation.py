"""Assemble and run sampling from the composed Hydra config (the body of `sample.py`).

    model      our checkpoint (`checkpoint=`: the model is rebuilt from the config stored in it, EMA
               weights) or a model config (`model=sit_xl2 model.checkpoint=...`)
    guidance   configs/guidance/<method>.yaml -> erg.guidance.build_guidance (validated up front)
    samples    index i -> noise from (seed, i) and a condition: class classes[i // per_class] or
               prompt prompts[i // per_prompt]; every method sees the same (noise, condition) pairs
    output     data/sample_store.py shards (ADM-style npz or png) + per-sample records, written
               atomically; config.yaml and guidance.yaml next to them; a rerun skips finished shards
    ranks      torchrun (RANK / WORLD_SIZE), SLURM (SLURM_PROCID / SLURM_NTASKS) or rank= / world_size=:
               each rank takes its own shards (no duplicates, no gaps)

`mode=grid` instead samples the same few (noise, class) pairs with several guidance configs and
writes one image grid (a row per method) for eyeballing (videos: their middle frames).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from models.runtime import (
    ConfigError,
    build_dataclass,
    check_device,
    check_keys,
    check_kwargs,
    check_missing,
    check_top_level,
    check_value,
    composition_error,
    flat_diff,
    target_of,
)

log = logging.getLogger("erg.sample")

TOP_LEVEL_KEYS = {
    "checkpoint", "model", "data", "autoencoder", "text_encoder", "guidance", "sampler", "classes", "per_class",
    "prompts", "per_prompt", "num_samples", "seed", "batch_size", "name", "out_dir", "format", "shard_size", "device",
    "rank", "world_size", "progress", "mode", "grid", "hydra",
}  # fmt: skip
# What decides the images: a rerun into the same out_dir must agree on these.
IDENTITY_KEYS = (
    "checkpoint", "model", "data", "autoencoder", "text_encoder", "guidance", "sampler", "classes", "per_class",
    "prompts", "per_prompt", "num_samples", "seed", "format", "shard_size",
)  # fmt: skip
# Keys inside IDENTITY_KEYS that guard a run without changing its images (a folder sampled before such a key
# existed, or with another value of it, holds the same images): left out of the comparison.
NOT_IDENTITY = ("guidance.max_map_gb",)
GRID_KEYS = ("methods", "per_row", "classes", "path")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


# --- checks ----------------------------------------------------------------------------------------
def validate(cfg: DictConfig) -> dict[str, Any]:
    """Check the whole config before any model is loaded; return it resolved as plain containers."""
    from erg.guidance import GuidanceConfigError, build_guidance
    from erg.sampler import SamplerConfig

    check_missing(cfg)
    check_top_level(cfg, TOP_LEVEL_KEYS)
    check_keys(cfg.get("grid"), GRID_KEYS, "grid")
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:
        raise ConfigError(f"could not resolve the config: {err}") from err
    container.pop("hydra", None)
    try:
        build_guidance(container["guidance"])
    except GuidanceConfigError as err:
        raise ConfigError(str(err)) from err
    build_dataclass(SamplerConfig, container["sampler"], "sampler")
    if not container.get("checkpoint") and not container.get("model"):
        raise ConfigError(
            "nothing to sample: set checkpoint=runs/<name>/checkpoints/last.ckpt (a model trained here) or "
            "model=<config> model.checkpoint=<file> (e.g. model=sit_xl2 for the SiT-XL/2 release)"
        )
    if container.get("checkpoint") and container.get("model"):
        raise ConfigError(
            "give either checkpoint=... (a checkpoint of this repo, which carries its model config) or "
            "model=<config> model.checkpoint=..., not both"
        )
    if container.get("model"):
        check_kwargs(cfg.model, target_of(cfg.model), "model")
    if container["mode"] not in ("samples", "grid"):
        raise ConfigError(f"mode must be 'samples' or 'grid', got {container['mode']!r}")
    if container["format"] not in ("npz", "png"):
        raise ConfigError(f"format must be 'npz' (ADM layout) or 'png', got {container['format']!r}")
    for key in ("batch_size", "shard_size", "per_class", "per_prompt"):
        check_value(container[key], key, int, minimum=1)
    check_value(container.get("num_samples"), "num_samples", int, minimum=1, allow_none=True)  # null: the default
    check_value(container["seed"], "seed", int)
    check_value(container["grid"]["per_row"], "grid.per_row", int, minimum=1)
    if container.get("prompts") and container.get("classes") not in (None, "all"):
        raise ConfigError("give either classes=... or prompts=..., not both")
    return container


# --- model -----------------------------------------------------------------------------------------
def _instantiate_model(model_cfg: dict[str, Any]) -> torch.nn.Module:
    """The model; its own errors (missing weights, bad sizes) surface as they are, not wrapped by Hydra."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(model_cfg)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError | FileNotFoundError):
            raise err.__cause__ from None
        if isinstance(err.__cause__, ValueError) and str(model_cfg.get("_target_", "")).startswith("erg.integrations."):
            raise ConfigError(str(err.__cause__)) from None  # a diffusers family's bad setting or folder: one line
        raise


def load_model(
    container: dict[str, Any], path: str | None = None, what: str = "checkpoint"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model to sample (EMA weights), and what is known about it: {"model": the model config it
    was built from, "autoencoder": the autoencoder config it was trained with (latent data) or None,
    "text_encoder": the text encoder config it was trained with (text-to-image) or None}.

    `path` (AutoGuidance's weak checkpoint) is read like `checkpoint`: a checkpoint of this repo
    brings its own config; any other file (DiT/SiT release) gets the main model's architecture.
    `what` is the config key that named the file (errors name it).
    """
    from models.checkpoints import load_into, read_checkpoint

    main_cfg = container.get("model") or {}
    if path and str(main_cfg.get("_target_", "")).startswith("erg.integrations."):
        # a public diffusers model's weak model (AutoGuidance): another pipeline folder of the same family
        model_cfg = {**main_cfg, "path": str(path)}
        model = _instantiate_model(model_cfg)
        info = {"model": model_cfg, "autoencoder": None, "text_encoder": None, "decode": model.decode}
        return model.eval().requires_grad_(False), info
    path = path or container.get("checkpoint")
    autoencoder = text_encoder = None
    if path:
        ckpt = read_checkpoint(path, what)
        stored = ckpt.get("config") if isinstance(ckpt, dict) else None
        if isinstance(stored, dict) and isinstance(stored.get("data"), dict):
            autoencoder = stored["data"].get("autoencoder")
        if isinstance(stored, dict):
            text_encoder = stored.get("text_encoder")  # frozen encoders are not in checkpoints, their config is
        if isinstance(stored, dict) and "model" in stored:
            model_cfg = dict(stored["model"])
        elif container.get("model"):
            model_cfg = dict(container["model"])
        else:
            raise ConfigError(
                f"{what}={path} carries no model config (not a checkpoint of this repo): also give model=<config> "
                "(e.g. model=sit_xl2) so the architecture is known"
            )
        del ckpt
        model_cfg["checkpoint"] = None  # weights come from `path` below, not from a training init
        model = _instantiate_model(model_cfg)
        described = str(model_cfg.get("arch") or model_cfg.get("_target_"))
        load_into(model, path, prefer_ema=True, describe=described, what=what)
        model_cfg["checkpoint"] = str(path)
    else:
        model_cfg = dict(container["model"])
        model = _instantiate_model(model_cfg)
    info = {"model": model_cfg, "autoencoder": autoencoder, "text_encoder": text_encoder,
            "decode": getattr(model, "decode", None)}  # fmt: skip
    return model.eval().requires_grad_(False), info


def build_decoder(container: dict[str, Any], device: torch.device, stored: dict[str, Any] | None = None) -> Any:
    """Model space -> images in [-1, 1]: the configured autoencoder's decode, else the one the
    checkpoint was trained with (its data config), else the model's own (a diffusers pipeline brings its
    VAE), else identity (pixel models)."""
    config = container.get("autoencoder") or (stored or {}).get("autoencoder")
    if not config:
        own = (stored or {}).get("decode")
        return own if own is not None else (lambda x: x)
    from hydra.utils import instantiate

    autoencoder = instantiate(config)
    if isinstance(autoencoder, torch.nn.Module):
        autoencoder = autoencoder.to(device).eval()
    if not hasattr(autoencoder, "decode"):
        raise ConfigError(f"autoencoder {type(autoencoder).__name__} has no decode(latents) method")
    return autoencoder.decode


def prompts_conditioning(conditioner: torch.nn.Module) -> Any:
    """A `models.text_encoders.TextConditioner` as the sampler's conditioning: prompts -> {"context",
    "pooled"} (the MMDiT's inputs), the null condition = every encoder dropped (its unconditional
    input), C-ERG on the encoders by their config names (e.g. llama3_8b, flan_t5_xl)."""
    from erg.conditioning import Prompts

    def inputs(cond: Any) -> dict[str, torch.Tensor]:
        return {"context": cond.context, **({"pooled": cond.pooled} if cond.pooled is not None else {})}

    return Prompts(
        lambda prompts: inputs(conditioner(prompts)),
        {name: enc.model for name, enc in conditioner.encoders.items()},
        noisable=("context",),
        null=lambda n: inputs(conditioner.unconditional(n)),
    )


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (N, C, H, W) -> uint8 (N, H, W, C), as DiT's sample_ddp.py: clamp(127.5 x + 128);
    videos (N, C, F, H, W) -> (N, F, H, W, C)."""
    order = (0, 2, 3, 1) if images.ndim == 4 else (0, 2, 3, 4, 1)
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8).permute(*order).cpu().numpy()


# --- what to sample --------------------------------------------------------------------------------
class Conditions:
    """Sample index -> condition (class label, prompt or nothing) and its per-sample record.

    Text-to-image models sample prompts[i // per_prompt] of a prompt file; without a prompt file they
    sample unconditionally, every sample with the empty prompt (the paper's unconditional setting,
    Table 2; set num_samples).
    """

    def __init__(self, container: dict[str, Any], model: torch.nn.Module, text: bool | None = None):
        from erg.sampling import sample_seed

        self.seed_of = lambda i: sample_seed(container["seed"], i)
        self.labels: list[int] | None = None
        self.prompts: list[str] | None = None
        num_classes = getattr(model, "num_classes", 0)
        if text is None:
            text = bool(container.get("text_encoder")) or callable(getattr(model, "conditioning", None))
        if container.get("prompts"):
            if not text:
                raise ConfigError(
                    f"prompts=... needs a text-to-image model and its text_encoder=...; {type(model).__name__} "
                    f"is {'class-conditional' if num_classes else 'unconditional'} here (use classes= / num_samples=)"
                )
            path = Path(container["prompts"]).expanduser()
            if not path.is_file():
                raise ConfigError(f"prompts={path}: no such file (one prompt per line)")
            self.prompts = read_prompts(path)
            self.per = container["per_prompt"]
            default_n = len(self.prompts) * self.per
        elif text:
            if container.get("classes") not in (None, "all"):
                raise ConfigError("a text-to-image model takes prompts=<file>, not classes=...")
            self.prompts = [""]  # unconditional: the empty prompt for every sample
            self.per = 1
            default_n = None
        elif num_classes:
            classes = container.get("classes")
            if classes in (None, "all"):
                classes = list(range(num_classes))
            if isinstance(classes, int):
                classes = [classes]
            bad = [c for c in classes if not (isinstance(c, int) and 0 <= c < num_classes)]
            if bad or not classes:
                raise ConfigError(f"classes must be 'all' or a list of ids in [0, {num_classes}), got {classes!r}")
            self.labels = list(classes)
            self.per = container["per_class"]
            default_n = len(self.labels) * self.per
        else:
            if container.get("classes") not in (None, "all"):
                raise ConfigError("this model is unconditional: drop classes=...")
            self.per = 1
            default_n = None
        n = container.get("num_samples") if container.get("num_samples") is not None else default_n
        if not n or n < 1:
            hint = " (a text-to-image model without prompts=... samples the empty prompt)" if text else ""
            raise ConfigError(f"this model is unconditional{hint}: set num_samples=N")
        self.num_samples = int(n)

    def of(self, indices: range | list[int]) -> list[Any] | None:
        if self.labels is not None:
            return [self.labels[(i // self.per) % len(self.labels)] for i in indices]
        if self.prompts is not None:
            return [self.prompts[(i // self.per) % len(self.prompts)] for i in indices]
        return None

    def records(self, indices: range | list[int]) -> list[dict[str, Any]]:
        conds = self.of(indices)
        out = []
        for j, i in enumerate(indices):
            record: dict[str, Any] = {"index": i, "seed": self.seed_of(i)}
            if self.labels is not None:
                record["label"] = conds[j]
            if self.prompts is not None:
                record["prompt"] = conds[j]
            out.append(record)
        return out


def read_prompts(path: Path) -> list[str]:
    """The prompts of a prompt file, one per line: prompt i is line i + 1, so that indices match the
    file's line numbers (and files made beside it, e.g. COCO's pairs.jsonl). Blank lines are refused
    rather than dropped (every later prompt would shift) or sampled as the empty prompt (unconditional
    samples by accident); blank lines at the very end are ignored."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ConfigError(f"prompts={path} holds no prompts (one prompt per line)")
    blank = [i + 1 for i, line in enumerate(lines) if not line]
    if blank:
        shown = ", ".join(map(str, blank[:5])) + (f" (+{len(blank) - 5} more)" if len(blank) > 5 else "")
        raise ConfigError(
            f"prompts={path}: line(s) {shown} are blank. Prompt k is line k + 1 of the file (sample i takes prompt "
            "i // per_prompt), so a blank line is refused rather than skipped (later prompts would shift) or "
            "sampled as the empty prompt: remove the blank lines (unconditional samples: drop prompts=, set "
            "num_samples=N)"
        )
    return lines


def rank_and_world(container: dict[str, Any]) -> tuple[int, int]:
    """This process' rank: explicit rank/world_size, else torchrun's or SLURM's environment, else 0 of 1."""
    if container.get("rank") is not None or container.get("world_size") is not None:
        rank, world = int(container.get("rank") or 0), int(container.get("world_size") or 1)
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    elif "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    else:
        rank, world = 0, 1
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"invalid rank {rank} for world size {world}")
    return rank, world


def pick_device(container: dict[str, Any]) -> torch.device:
    name = container.get("device") or "auto"
    if name != "auto":
        return check_device(name)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def text_encoder_config(container: dict[str, Any], info: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The text encoders to sample with: text_encoder=... if given, else those the checkpoint was trained with."""
    return container.get("text_encoder") or (info or {}).get("text_encoder")


def build_conditioning(container: dict[str, Any], device: torch.device, info: dict[str, Any] | None = None) -> Any:
    """The text conditioning of a text-to-image model (text_encoder=..., or the checkpoint's), or None
    (the model conditions itself: class labels, or its own `conditioning()`)."""
    config = text_encoder_config(container, info)
    if not config:
        return None
    from hydra.utils import instantiate

    return prompts_conditioning(instantiate(config).to(device))


# What a weak model must share with the main one to guide it (AutoGuidance: a smaller or earlier model
# of the same data): the input it denoises, the velocity it predicts, the conditions it takes.
SHARED_SIZES = ("in_channels", "input_size", "out_channels", "num_classes", "context_dim", "pooled_dim")


def check_weak_model(weak: torch.nn.Module, main: torch.nn.Module, path: str) -> None:
    """AutoGuidance's weak model must fit the main one (depth and width may differ, the data may not)."""
    differ = [
        f"{k} {getattr(weak, k, None)} (weak) vs {getattr(main, k, None)} (main)"
        for k in SHARED_SIZES
        if getattr(weak, k, None) != getattr(main, k, None)
    ]
    if differ:
        raise ConfigError(
            f"guidance.checkpoint={path}: AutoGuidance's weak model does not fit the main model ({', '.join(differ)}). "
            "The weak model must be a smaller or earlier model trained on the same data (same input size, channels "
            "and conditions), e.g. an earlier checkpoint of the same run"
        )


def _unconditional(model: torch.nn.Module, conditions: Conditions | None) -> bool:
    """Whether every sample sees the same (null) condition: a model without classes or text encoders."""
    if conditions is not None and (conditions.labels is not None or conditions.prompts is not None):
        return False
    return not getattr(model, "num_classes", 0) and not callable(getattr(model, "conditioning", None))


def check_guidance_has_effect(guidance: Any, unconditional: bool) -> None:
    """Refuse a guidance whose extra branches differ from the positive one only by the condition, on a
    model without conditions: every branch would give the same prediction, so it would cost NFE forwards
    and change nothing (CFG, APG, C-ERG alone on an unconditional model)."""
    if not unconditional:
        return
    pos = guidance.branch("pos")
    same = [
        b.name for b in guidance.branches
        if b.name != "pos" and b.model == pos.model and b.perturbation is None and not b.capture
        and b.input is None and b.condition.noise is None
    ]  # fmt: skip
    if same and len(same) == len(guidance.branches) - 1:
        raise ConfigError(
            f"guidance={guidance.name} contrasts the condition with the null condition, but this model is "
            f"unconditional: its branches {['pos', *same]} would all give the same prediction, {guidance.nfe} "
            "forwards per step for nothing. Use guidance=none, or a guidance that perturbs the model (i_erg, erg, "
            "pag, seg, sag, autoguidance)"
        )


def build_sampler(container: dict[str, Any], guidance_cfg: dict[str, Any], model: torch.nn.Module,
                  conditioning: Any = None, conditions: Conditions | None = None) -> Any:  # fmt: skip
    """The guided sampler, every check done before any sampling: the guidance's layers against the model,
    C-ERG's encoders, AutoGuidance's weak model, and a guidance that would change nothing."""
    from erg.guidance import build_guidance
    from erg.sampler import GuidedSampler, SamplerConfig

    guidance = build_guidance(guidance_cfg)
    check_guidance_has_effect(guidance, conditioning is None and _unconditional(model, conditions))
    models = {"main": model}
    if "weak" in guidance.models:
        path = guidance_cfg["checkpoint"]
        try:
            weak, _ = load_model(container, path=path, what="guidance.checkpoint")
        except ConfigError as err:
            raise ConfigError(f"AutoGuidance's weak model: {err}") from err
        check_weak_model(weak, model, path)
        models["weak"] = weak.to(next(model.parameters()).device)
    conditionings = {name: conditioning for name in models} if conditioning is not None else None
    try:
        return GuidedSampler(guidance, models, conditionings, config=SamplerConfig(**container["sampler"]))
    except ValueError as err:
        raise ConfigError(str(err)) from err


# --- the run ---------------------------------------------------------------------------------------
def check_run_config(container: dict[str, Any], out_dir: str | Path) -> None:
    """Refuse an out_dir whose config.yaml was written with other settings that decide the images
    (IDENTITY_KEYS); nothing to check where no config.yaml exists yet. Sweeps call this before
    deciding that a point is done (eval/sweep.py)."""
    path = Path(out_dir) / "config.yaml"
    if not path.is_file():
        return
    old = OmegaConf.to_container(OmegaConf.load(path))
    changed = flat_diff({k: old.get(k) for k in IDENTITY_KEYS}, {k: container.get(k) for k in IDENTITY_KEYS})
    changed = [line for line in changed if line.split(":", 1)[0] not in NOT_IDENTITY]
    if changed:
        raise ConfigError(
            f"{out_dir} already holds samples made with other settings:\n  " + "\n  ".join(changed) + "\n"
            "Use another out_dir (or the same settings) so existing samples are not mixed."
        )


def _save_run_config(container: dict[str, Any], out_dir: Path, nfe: int) -> None:
    """config.yaml (everything) and guidance.yaml next to the samples; refuse to mix other settings.
    The one writer of a sample folder's config.yaml (sweeps included)."""
    from models.io import atomic_write_text

    check_run_config(container, out_dir)
    if (out_dir / "config.yaml").is_file():
        return
    run_info = {**container, "nfe": nfe}  # function evaluations per image and step (eval/runs.py reads it)
    atomic_write_text(out_dir / "guidance.yaml", OmegaConf.to_yaml(OmegaConf.create(container["guidance"])))
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(run_info)))


def _model_choice(cfg: DictConfig) -> str | None:
    """The name of the chosen model config (model=flux_dev -> "flux_dev"), from Hydra's record of the run."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("model")
    else:
        choice = OmegaConf.select(cfg, "hydra.runtime.choices.model", default=None)
    return None if choice in (None, "null") else str(choice)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Sample (or, with mode=grid, draw a comparison grid); returns a summary."""
    container = validate(cfg)
    if container["mode"] == "grid":  # the rows get the chosen model's presets (hydra's record of the choice)
        return run_grid(container, model_choice=_model_choice(cfg))

    from tqdm import tqdm

    from data.sample_store import SampleStore, shards_for_rank

    rank, world = rank_and_world(container)
    device = pick_device(container)
    model, info = load_model(container)
    model = model.to(device)
    conditioning = build_conditioning(container, device, info)
    conditions = Conditions(container, model, text=conditioning is not None or None)
    sampler = build_sampler(container, container["guidance"], model, conditioning, conditions)
    decode = build_decoder(container, device, info)

    out_dir = Path(container["out_dir"]).expanduser()
    store = SampleStore(out_dir, conditions.num_samples, container["shard_size"], container["format"])
    try:
        store.write_layout()
    except ValueError as err:
        raise ConfigError(str(err)) from err
    _save_run_config(container, out_dir, sampler.guidance.nfe)

    mine = shards_for_rank(store.num_shards, rank, world)
    todo = store.missing_shards(mine)
    total = sum(len(store.shard_indices(s)) for s in todo)
    log.info(
        "rank %d/%d: %d of its %d shards to sample (%d images), guidance %s (NFE %d), %s",
        rank, world, len(todo), len(mine), total, sampler.guidance.name, sampler.guidance.nfe, device,
    )  # fmt: skip
    bar = tqdm(total=total, unit="img", disable=not container["progress"], desc=f"{sampler.guidance.name}")
    start, done = time.perf_counter(), 0
    for shard in todo:
        indices = store.shard_indices(shard)
        images = []
        for lo in range(0, len(indices), container["batch_size"]):
            batch = indices[lo : lo + container["batch_size"]]
            x = sampler.sample_indices(batch, conditions.of(batch), base_seed=container["seed"])
            with torch.no_grad():
                images.append(to_uint8(decode(x)))
            bar.update(len(batch))
            done += len(batch)
        store.write_shard(shard, np.concatenate(images), conditions.records(indices))
    bar.close()
    seconds = time.perf_counter() - start
    return {
        "out_dir": str(out_dir),
        "num_samples": conditions.num_samples,
        "rank": rank,
        "world_size": world,
        "sampled": done,
        "skipped_shards": len(mine) - len(todo),
        "seconds": seconds,
        "images_per_second": done / seconds if done else None,
        "complete": not store.missing_shards(),
    }


# --- grid mode -------------------------------------------------------------------------------------
def compose_guidance(entry: str, model: str | None = None) -> tuple[str, dict[str, Any]]:
    """A grid entry "erg image.layers=[2,4] scale=2" -> (label, the resolved guidance config).

    model: the `model=` choice, so that the model's own guidance presets apply as they do in a plain
    run (configs/presets/: erg means erg_flux on flux_dev, the public SiT-XL/2's 3 guided channels)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    name, *overrides = entry.split()
    overrides = [*([f"model={model}"] if model else []), f"guidance={name}", *(f"guidance.{o}" for o in overrides)]
    try:
        if GlobalHydra.instance().is_initialized():
            cfg = compose(config_name="sample", overrides=overrides)
        else:
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                cfg = compose(config_name="sample", overrides=overrides)
    except Exception as err:  # a misspelled key: named with its closest match, as on the command line
        raise ConfigError(f"grid entry {entry!r}: {composition_error(err)}") from err
    return entry, OmegaConf.to_container(cfg.guidance, resolve=True)


def run_grid(container: dict[str, Any], model_choice: str | None = None) -> dict[str, Any]:
    """Rows = guidance configs (grid.methods, with the presets of `model_choice`, the model config's name),
    columns = the same (noise, class) pairs."""
    from PIL import Image, ImageDraw

    from models.io import image_grid, label_font, save_image, text_width

    grid_cfg = container["grid"]
    # every entry checked before any work, with the chosen model's presets
    entries = [compose_guidance(entry, model=model_choice) for entry in grid_cfg["methods"]]
    device = pick_device(container)
    model, info = load_model(container)
    model = model.to(device)
    decode = build_decoder(container, device, info)
    conditioning = build_conditioning(container, device, info)
    n = int(grid_cfg["per_row"])
    num_classes = getattr(model, "num_classes", 0)
    if conditioning is not None or callable(getattr(model, "conditioning", None)):
        # text-to-image: one prompt per column, wrapping (the empty prompt without a prompt file)
        prompts = Conditions({**container, "num_samples": n}, model, text=True).prompts
        labels = [prompts[j % len(prompts)] for j in range(n)]
    else:
        classes = grid_cfg.get("classes") or (list(range(num_classes)) if num_classes else None)
        labels = [classes[j % len(classes)] for j in range(n)] if classes else None
    samplers = []
    for label, guidance_cfg in entries:  # every row's layers, encoders and weak model checked before any sampling
        try:
            samplers.append((label, build_sampler(container, guidance_cfg, model, conditioning)))
        except ConfigError as err:
            raise ConfigError(f"grid entry {label!r}: {err}") from err
    rows, names = [], []
    for label, sampler in samplers:
        x = sampler.sample_indices(range(n), labels, base_seed=container["seed"])
        images = decode(x).float().cpu()
        if images.ndim == 5:  # videos (N, C, F, H, W): the grid shows each one's middle frame
            images = images[:, :, images.shape[2] // 2]
        rows.append(images)
        names.append(label)
        log.info("grid row: %s", label)
    grid = image_grid(torch.cat(rows), nrow=n, min_size=64)  # (H, W, C) uint8
    # a left margin with each row's method
    row_h = grid.shape[0] // len(rows)
    shown = [s if len(s) <= 28 else s[:27] + "..." for s in names]  # full names: the log and the summary
    font = label_font()
    margin = 12 + max(text_width(font, s) for s in shown)
    canvas = Image.new("RGB", (grid.shape[1] + margin, grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid.numpy()).convert("RGB"), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for r, name in enumerate(shown):
        draw.text((4, r * row_h + row_h // 2 - 8), name, fill="black", font=font)
    path = Path(grid_cfg["path"]).expanduser()
    save_image(path, torch.from_numpy(np.array(canvas)))
    return {"grid": str(path), "methods": names, "per_row": n}
