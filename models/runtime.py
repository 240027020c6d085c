"""What the entry points share: config checks with helpful errors, run directories and resuming,
loggers, and the assembly of a training run from a Hydra config (`train.py` stays thin).
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from models.io import atomic_write_text

__all__ = [
    "ConfigError",
    "build_dataclass",
    "check_device",
    "check_keys",
    "check_kwargs",
    "check_missing",
    "check_top_level",
    "check_types",
    "check_value",
    "composition_error",
    "find_resume_checkpoint",
    "flat_diff",
    "register_resolvers",
    "wandb_logger",
]


class ConfigError(ValueError):
    """A user-fixable problem with the configuration; the message says how to fix it."""


# --- config checks ---------------------------------------------------------------------------------
def register_resolvers() -> None:
    """OmegaConf resolvers used by the configs (idempotent)."""
    if not OmegaConf.has_resolver("class_count"):
        from data.imagefolder import count_class_folders

        OmegaConf.register_new_resolver("class_count", count_class_folders)


def check_missing(cfg: DictConfig, command: str = "python train.py") -> None:
    """Fail early, naming every required value (`???`) left unset."""
    missing = sorted(_missing_keys(cfg))
    if missing:
        example = " ".join(f"{k}=..." for k in missing)
        raise ConfigError(
            f"missing required config value(s): {', '.join(missing)}. Set them on the command line, "
            f"e.g. `{command} {example}`"
        )


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys holding `???`, found without resolving interpolations (which may need them)."""
    from omegaconf import ListConfig

    out = []
    if isinstance(node, DictConfig):
        items = [(str(k), k) for k in node]
    elif isinstance(node, ListConfig):
        items = [(str(i), i) for i in range(len(node))]
    else:
        return out
    for name, key in items:
        full = f"{prefix}{name}"
        if OmegaConf.is_missing(node, key):
            out.append(full)
        elif not OmegaConf.is_interpolation(node, key):
            out += _missing_keys(node._get_node(key), full + ".")
    return out


def _allowed_keys(target: Callable[..., Any]) -> set[str] | None:
    """Keyword arguments `target` accepts (None: anything). Follows `forwards_to` for factories."""
    allowed: set[str] = set()
    while target is not None:
        sig = inspect.signature(target)
        var_kw = False
        for name, p in sig.parameters.items():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                var_kw = True
            elif p.kind is not inspect.Parameter.VAR_POSITIONAL and name != "self":
                allowed.add(name)
        if not var_kw:
            return allowed
        target = getattr(target, "forwards_to", None)
    return None


def _unknown_key_error(unknown: list[str], allowed: set[str] | list[str], path: str) -> ConfigError:
    """`unknown config key(s): optim.lrr (did you mean optim.lr?)...`; path "" is the top level."""
    dotted = (lambda k: f"{path}.{k}") if path else str
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), sorted(map(str, allowed)), n=1)
        hints.append(dotted(key) + (f" (did you mean {dotted(close[0])}?)" if close else ""))
    where = f"of {path}" if path else "at the top level"
    return ConfigError(
        f"unknown config key(s): {', '.join(hints)}. Valid keys {where}: {', '.join(sorted(map(str, allowed)))}"
    )


def check_top_level(cfg: DictConfig, allowed: set[str]) -> None:
    """Unknown top-level keys (added with `+key=...`) named with a close match."""
    unknown = [k for k in cfg if k not in allowed]
    if unknown:
        raise _unknown_key_error(unknown, allowed - {"hydra"}, "")


def check_keys(node: DictConfig | dict | None, allowed: tuple[str, ...] | set[str], path: str) -> None:
    """Unknown keys of a plain config node (no `_target_` to read them from), named with a close match."""
    unknown = [k for k in (node or {}) if k not in allowed]
    if unknown:
        raise _unknown_key_error(unknown, set(allowed), path)


def composition_error(err: Exception) -> ConfigError:
    """One actionable line for what Hydra raises while composing a config from the command line.

    A misspelled key (`optim.lrr=0.1`, no `+`) is named with the closest existing key; Hydra's own
    message would advise appending the typo with `+`, which silently adds a key nothing reads."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = err.__cause__
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and "Could not override" in str(err):
        full_key = str(getattr(cause, "full_key", None) or getattr(cause, "key", ""))
        parent = getattr(cause, "parent_node", None)
        path, _, key = full_key.rpartition(".")
        allowed = [str(k) for k in parent] if hasattr(parent, "keys") else []
        message = str(_unknown_key_error([key], set(allowed) - {"hydra"}, path))
        if not difflib.get_close_matches(key, allowed, n=1):  # not a typo of an existing key: say how to add one
            message += ". To add a key the config does not list on purpose, prefix it with +"
        return ConfigError(message)
    if isinstance(err, MissingConfigException) and err.options:
        missing = str(err.missing_cfg_file or "")
        group, _, name = missing.rpartition("/")
        close = difflib.get_close_matches(name, list(err.options), n=1)
        hint = f" (did you mean {group}={close[0]}?)" if close else ""
        return ConfigError(
            f"{group}={name}: no config configs/{missing}.yaml{hint}. Options of {group}: {', '.join(err.options)}"
        )
    if isinstance(err, OverrideParseException):
        return ConfigError(
            f"cannot parse the command-line override {err.override!r}: {err.message.splitlines()[0]}. Quote values "
            "with spaces, commas or brackets, e.g. 'grid.methods=[cfg,\"erg scale=2\"]'"
        )
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if cause is not None and str(cause) and str(cause) not in text:
        text += ": " + " ".join(line.strip() for line in str(cause).splitlines() if line.strip())
    return ConfigError(text)


def check_kwargs(node: DictConfig | dict, target: Callable[..., Any], path: str, ignore: tuple[str, ...] = ()) -> None:
    """Raise a ConfigError naming keys of `node` that `target` does not accept, or values of the wrong
    type for its annotated parameters (`trainer.max_steps=abc`: Lightning would fail deep inside)."""
    allowed = _allowed_keys(target)
    keys = [k for k in node if not str(k).startswith("_") and k not in ignore]
    if allowed is not None:
        unknown = [k for k in keys if k not in allowed]
        if unknown:
            raise _unknown_key_error(unknown, allowed, path)
    check_types(node, _parameter_types(target), path, keys)


def build_dataclass(cls: type, node: DictConfig | dict | None, path: str) -> Any:
    """Instantiate a config dataclass, turning unknown keys and bad values into ConfigErrors."""
    import typing

    assert is_dataclass(cls)
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    allowed = {f.name for f in fields(cls)}
    unknown = [k for k in values if k not in allowed]
    if unknown:
        raise _unknown_key_error(unknown, allowed, path)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not evaluate: no type checks
        hints = {}
    check_types(values, hints, path, list(values))
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err


# --- value types -------------------------------------------------------------------------------------
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def _plain_types(annotation: Any) -> tuple[type, ...] | None:
    """The plain types an annotation allows (int, float, bool, str, None), or None if it allows others
    too (lists, objects, literals: not checked here)."""
    import types
    import typing

    if annotation is None or annotation is type(None):
        return (type(None),)
    if annotation in (int, float, bool, str):
        return (annotation,)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        out: tuple[type, ...] = ()
        for arg in typing.get_args(annotation):
            plain = _plain_types(arg)
            if plain is None:
                return None
            out += plain
        return out
    return None


def type_problem(value: Any, annotation: Any) -> str | None:
    """'must be an integer, got 'abc'' when `value` does not fit a plain annotation, else None."""
    allowed = _plain_types(annotation)
    if allowed is None:
        return None
    if value is None:
        ok = type(None) in allowed
    elif isinstance(value, bool):
        ok = bool in allowed
    elif isinstance(value, int):
        ok = int in allowed or float in allowed
    elif isinstance(value, float):
        ok = float in allowed
    elif isinstance(value, str):
        ok = str in allowed
    else:
        ok = False
    if ok:
        return None
    return f"must be {' or '.join(_TYPE_NAMES[t] for t in allowed)}, got {value!r}"


def check_types(node: DictConfig | dict, hints: dict[str, Any], path: str, keys: list[Any]) -> None:
    """ConfigError for the first of `keys` whose value does not fit its annotation in `hints`."""
    for key in keys:
        if key not in hints:
            continue
        try:
            value = node[key]
            if OmegaConf.is_config(value):
                continue  # lists / sub-configs: not plain values
        except Exception:  # an interpolation that does not resolve yet: checked where it is used
            continue
        problem = type_problem(value, hints[key])
        if problem:
            example = {int: "1000", float: "0.5", bool: "true", str: "name"}.get(_plain_types(hints[key])[0], "...")
            raise ConfigError(f"{path}.{key} {problem} (e.g. {path}.{key}={example})")


def check_value(value: Any, key: str, kind: type = int, minimum: float | None = None, allow_none: bool = False) -> None:
    """A setting that must be an integer (kind int) or a number (kind float) >= minimum, or null if allowed."""
    if value is None and allow_none:
        return
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    fits = numeric and (kind is float or isinstance(value, int))
    if not fits or (minimum is not None and value < minimum):
        what = "an integer" if kind is int else "a number"
        bound = f" >= {minimum:g}" if minimum is not None else ""
        alt = " (or null)" if allow_none else ""
        raise ConfigError(f"{key} must be {what}{bound}{alt}, got {value!r}")


def check_device(name: Any, key: str = "device") -> Any:
    """torch.device(name), or a ConfigError naming `key` for a device that does not exist here
    (`device=cuda` on a machine without a visible GPU, a typo like `cdua`)."""
    import torch

    try:
        device = torch.device(str(name))
    except RuntimeError as err:
        raise ConfigError(f"{key}={name}: not a device torch knows ({err}); use cpu, cuda or cuda:<index>") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{key}={name} but no CUDA device is visible on this machine: use {key}=cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{key}={name} but only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")
    return device


def _parameter_types(target: Callable[..., Any]) -> dict[str, Any]:
    """Annotations of the keyword arguments `target` accepts (following `forwards_to`, like the keys)."""
    import typing

    hints: dict[str, Any] = {}
    while target is not None:
        fn = target.__init__ if isinstance(target, type) else target
        try:
            found = typing.get_type_hints(inspect.unwrap(fn))
        except Exception:  # annotations that do not evaluate here: no type checks for them
            found = {}
        for name, hint in found.items():
            hints.setdefault(name, hint)
        target = getattr(target, "forwards_to", None)
    hints.pop("return", None)
    return hints


def target_of(node: DictConfig) -> Callable[..., Any]:
    """The callable named by a config node's `_target_`, with a clear error if it does not exist."""
    from hydra.utils import get_object

    name = node.get("_target_")
    if not name:
        raise ConfigError(f"config node has no _target_: {OmegaConf.to_yaml(node)}")
    try:
        return get_object(name)
    except Exception as err:
        raise ConfigError(f"cannot import _target_ {name!r}: {err}") from err


def flat_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += flat_diff(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


# --- run directories -------------------------------------------------------------------------------
def _checkpoint_step(path: Path) -> int:
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", -1))
    except Exception:  # unreadable: never preferred over a readable one
        return -1


def run_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints a run can continue from: checkpoints/last.ckpt (ModelCheckpoint) and the
    hpc_ckpt_<n>.ckpt files Lightning writes into the run dir when SLURM signals a requeue."""
    last = run_dir / "checkpoints" / "last.ckpt"
    return ([last] if last.is_file() else []) + sorted(run_dir.glob("hpc_ckpt_*.ckpt"))


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The run's checkpoint with the highest training step (ties: the latest written)."""
    candidates = run_checkpoints(run_dir)
    if not candidates:
        return None
    return max(candidates, key=lambda p: (_checkpoint_step(p), p.stat().st_mtime_ns))


def find_resume_checkpoint(run_dir: Path, resume: str | bool | None) -> Path | None:
    """The checkpoint to resume from: `auto` takes the run's newest checkpoint (last.ckpt or a SLURM
    requeue checkpoint hpc_ckpt_<n>.ckpt, whichever holds the later step) if any; `never` refuses to
    overwrite an existing run; a path resumes from that file."""
    mode = str(resume).lower() if resume is not None else "never"
    if mode == "auto":
        return newest_checkpoint(run_dir)
    if mode in ("never", "false", "none"):
        existing = run_checkpoints(run_dir)
        if existing:
            raise ConfigError(
                f"{run_dir} already holds a run ({existing[0].relative_to(run_dir)}). Use resume=auto to continue "
                "it, or name=<new name> to start a new run next to it"
            )
        return None
    path = Path(str(resume)).expanduser()
    if not path.is_file():
        raise ConfigError(f"resume={resume}: no such checkpoint file")
    return path


def save_resolved_config(container: dict[str, Any], run_dir: Path, step: int | None) -> Path:
    """Write the resolved config next to the run (config.yaml; a resumed run with changed settings
    also writes config.resume-<step>.yaml so nothing earlier is overwritten)."""
    text = OmegaConf.to_yaml(OmegaConf.create(container))
    first = run_dir / "config.yaml"
    if not first.exists():
        return atomic_write_text(first, text)
    old = OmegaConf.to_container(OmegaConf.load(first))
    if old == container:
        return first
    return atomic_write_text(run_dir / f"config.resume-{step or 0}.yaml", text)


# --- loggers ---------------------------------------------------------------------------------------
def csv_logger(save_dir: str, name: str = "logs", version: str = "") -> Any:
    """Lightning's CSVLogger, but a resumed run appends to its metrics.csv instead of deleting it
    (Lightning's writer removes an existing metrics.csv when a new logger starts in the folder)."""
    import csv

    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class _AppendingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:
            if self._fs.isfile(self.metrics_file_path):
                with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                    self.metrics_keys = next(csv.reader(f), [])

    class _AppendingCSVLogger(CSVLogger):
        @property
        def experiment(self) -> ExperimentWriter:
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = _AppendingWriter(log_dir=self.log_dir)
            return self._experiment

    return _AppendingCSVLogger(save_dir=save_dir, name=name, version=version)


def _wandb_account_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_logger(
    project: str,
    save_dir: str,
    name: str | None = None,
    mode: str = "auto",
    entity: str | None = None,
    tags: list[str] | None = None,
) -> Any:
    """Lightning's WandbLogger, offline unless an account is configured (WANDB_API_KEY or
    `wandb login`) or WANDB_MODE says otherwise. The run id is kept in `<save_dir>/wandb_id.txt`,
    so a resumed or requeued job continues the same wandb run."""
    try:
        import wandb  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            "logger=wandb needs the wandb package (pip install wandb); logger=csv or logger=tensorboard work without it"
        ) from err
    from lightning.pytorch.loggers import WandbLogger

    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_account_configured() else "offline")
    if mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"logger.mode must be auto, online, offline or disabled, got {mode!r}")
    id_file = Path(save_dir) / "wandb_id.txt"
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = re.sub(r"[^A-Za-z0-9]", "-", name or "run")[:40] + "-" + uuid.uuid4().hex[:8]
        atomic_write_text(id_file, run_id)
    return WandbLogger(
        project=project,
        name=name,
        save_dir=save_dir,
        id=run_id,
        resume="allow",
        offline=mode == "offline",
        mode=mode,
        entity=entity,
        tags=tags,
    )
