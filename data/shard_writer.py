"""Write webdataset shards atomically and reproducibly (used by scripts/make_shards.py and
scripts/precompute_latents.py).

- Atomic: a shard is written to a hidden temporary file in the same folder, fsync'ed, then renamed
  to its final name, so a shard that exists is complete; an interrupted writer leaves only a
  temporary file, which the next write of that shard removes.
- Reproducible: members carry fixed metadata (mtime 0, uid/gid 0, no user/group names, mode 0444)
  in a fixed order (webdataset's TarWriter sorts a sample's members), so writing the same samples
  again gives byte-identical shards, and a resumed run equals an uninterrupted one.
- Plans: a writer records what it is writing (inputs, sizes, seeds) in a manifest on its first run
  and refuses to resume into a folder whose manifest differs.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import webdataset as wds

from models.io import atomic_write_text
from models.runtime import ConfigError

__all__ = ["check_manifest", "write_shard"]

PARTIAL_SUFFIX = ".partial"


def _partial_prefix(path: Path) -> str:
    return f".{path.name}."


def write_shard(path: str | Path, samples: Iterable[dict[str, Any]]) -> int:
    """Write `samples` (dicts of "__key__" plus member name -> bytes or str) to the tar `path`,
    atomically. Returns the number of samples written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{_partial_prefix(path)}*{PARTIAL_SUFFIX}"):  # left by a killed writer
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_partial_prefix(path), suffix=PARTIAL_SUFFIX)
    count = 0
    try:
        with os.fdopen(fd, "wb") as f:
            writer = wds.TarWriter(f, user="", group="", mode=0o444, mtime=0, encoder=False, compress=False)
            try:
                for sample in samples:
                    writer.write(
                        {k: v.encode() if isinstance(v, str) and k != "__key__" else v for k, v in sample.items()}
                    )
                    count += 1
            finally:
                writer.close()  # also on errors: the temporary file is then removed below
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def check_manifest(path: str | Path, plan: dict[str, Any]) -> None:
    """Write `plan` as the folder's manifest, or check that an existing manifest equals it."""
    path = Path(path)
    if path.is_file():
        old = json.loads(path.read_text())
        if old != plan:
            changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
            raise ConfigError(
                f"{path} describes a different run (changed: {', '.join(changed)}). These shards were written "
                "from other inputs or settings: write to a new output folder, or delete the folder to start over"
            )
        return
    atomic_write_text(path, json.dumps(plan, indent=1, sort_keys=True) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
