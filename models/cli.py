"""What every command-line tool of the repo shares: errors a user can act on, and progress bars.

Errors. A problem the user can fix (a config key, a value, a path, a file, a folder that cannot be
written) ends the program with ONE line on stderr, `error: <what is wrong and how to fix it>`, and
exit code 2, never a traceback; anything else (a bug) keeps its traceback. The entry points wrap
their bodies in `reported(...)`; `run_hydra(main)` also catches what Hydra itself raises while
composing the config (a misspelled key, an unknown config group option, an override it cannot
parse), which happens before the body runs:

    @hydra.main(config_path="configs", config_name="sample", version_base="1.3")
    def main(cfg):
        with reported(cfg, writes=WRITES):
            summary = run(cfg)
        ...

    if __name__ == "__main__":
        run_hydra(main, writes=WRITES)

Progress. `progress(...)` is tqdm with its rate and ETA on a terminal; off when stderr is not a
terminal (logs, SLURM output files) or when the tool's `--no-progress` flag says so.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from models.runtime import ConfigError, composition_error

__all__ = ["EXIT_USAGE", "add_progress_flag", "fail", "progress", "reported", "run_hydra", "user_error"]

EXIT_USAGE = 2  # the exit code of every user-fixable error (argparse uses 2 for bad arguments too)
_NOT_WRITABLE = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
}


# --- errors ----------------------------------------------------------------------------------------
def one_line(text: str) -> str:
    """A message on one line: its lines joined with '; ' (a message listing several items stays readable)."""
    out = ""
    for line in (line.strip() for line in str(text).splitlines()):
        if line:
            out += (" " if out.endswith(":") else "; " if out else "") + line
    return out


def fail(message: str) -> NoReturn:
    """Print `error: <message>` (one line) on stderr and exit with code 2."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


def _config_items(cfg: Any) -> list[tuple[str, str]]:
    """(dotted key, string value) of a config's string leaves (hydra.* left out), resolved where possible."""
    from omegaconf import OmegaConf

    if cfg is None:
        return []
    try:
        if OmegaConf.is_config(cfg):
            cfg = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    except Exception:  # an unresolvable config: no key to name
        return []
    out: list[tuple[str, str]] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, str) and node and not node.startswith("_"):
            out.append((prefix[:-1], node))

    walk(cfg, "")
    return out


def key_for_path(cfg: Any, path: str | Path) -> str | None:
    """The config key whose value is `path` or a folder above it (the most specific one), as `key=value`."""
    target = Path(os.path.abspath(Path(path).expanduser()))
    best: tuple[int, str] | None = None
    for key, value in _config_items(cfg):
        if "/" not in value and "." not in value:
            continue  # not a path-like value
        folder = Path(os.path.abspath(Path(value).expanduser()))
        if target == folder or folder in target.parents:
            depth = len(folder.parts)
            if best is None or depth > best[0]:
                best = (depth, f"{key}={value}")
    return best[1] if best else None


def _os_error(err: OSError, cfg: Any, writes: str) -> str | None:
    """The message of an OSError a user can fix (a folder not writable, a full disk, a missing file)."""
    name = err.filename or ""
    key = key_for_path(cfg, name) if name else None
    where = f" ({key})" if key else ""
    if err.errno in _NOT_WRITABLE:
        fix = f"choose a writable folder: {writes}" if writes else "choose a folder you can write to"
        if key:
            fix = f"{key.split('=')[0]} names a folder that cannot be written: {fix}"
        return f"cannot write {name}{where}: {_NOT_WRITABLE[err.errno]}. {fix}"
    if err.errno == errno.ENOSPC:
        return f"no space left on the device while writing {name}{where}: free some space or write elsewhere ({writes})"
    if isinstance(err, FileNotFoundError):
        if err.filename is None:  # our own messages (they name the key and the fix)
            return str(err)
        return f"no such file or folder: {name}{where}"
    if isinstance(err, NotADirectoryError | IsADirectoryError):
        return f"{err.strerror}: {name}{where}"
    return None


def user_error(err: BaseException, cfg: Any = None, writes: str = "") -> str | None:
    """The message for an error the user can fix, or None for anything else (a bug keeps its traceback).

    cfg: the composed config, to name the key that chose a path; writes: which settings choose the folders
    this tool writes to (e.g. "out_dir=<folder>"), for errors about folders that cannot be written."""
    from hydra.errors import HydraException, InstantiationException

    if isinstance(err, ConfigError):
        return str(err)
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        return user_error(err.__cause__, cfg, writes)  # the constructor's own error, not Hydra's wrapper
    if isinstance(err, HydraException):
        return str(composition_error(err))
    if isinstance(err, OSError):
        return _os_error(err, cfg, writes)
    return None


@contextmanager
def reported(cfg: Any = None, writes: str = "") -> Iterator[None]:
    """Run the body of a tool: an error the user can fix becomes one line on stderr and exit code 2."""
    try:
        yield
    except Exception as err:
        message = user_error(err, cfg, writes)
        if message is None:
            raise
        fail(message)


def run_hydra(main: Callable[[], Any], writes: str = "") -> None:
    """Call a `@hydra.main` function so that Hydra's own errors (composing the config, creating its
    run folder) are reported like the body's: one line and exit code 2.

    Hydra prints such errors itself (several lines, with the advice to append a misspelled key with
    `+`) unless HYDRA_FULL_ERROR is set; it is set here while `main` runs so that they reach this
    function. A user who sets HYDRA_FULL_ERROR gets Hydra's full tracebacks, untouched."""
    if os.environ.get("HYDRA_FULL_ERROR"):
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        with reported(writes=writes):
            main()
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)


# --- progress --------------------------------------------------------------------------------------
def add_progress_flag(parser: Any) -> None:
    """`--no-progress` for an argparse tool (bars are off anyway when stderr is not a terminal)."""
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (it is off anyway when stderr is not a terminal)")  # fmt: skip


def progress(iterable: Any = None, *, enabled: bool = True, **kwargs: Any) -> Any:
    """tqdm (rate and ETA) when `enabled` and stderr is a terminal; a silent stand-in otherwise."""
    from tqdm import tqdm

    return tqdm(iterable, disable=None if enabled else True, dynamic_ncols=True, **kwargs)


_ADDRESS = re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>")


def strip_addresses(text: str) -> str:
    """Drop Python object reprs (`<_io.BytesIO object at 0x7f...>`) from a message: they name nothing."""
    return _ADDRESS.sub("", text).replace("  ", " ").strip()
