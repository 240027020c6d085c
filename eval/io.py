"""ADM-style `.npz` image batches (`arr_0`: uint8 NHWC), read and written without holding them in memory,
and atomic `.npz` writes for arrays (cached statistics and features).

`read_npz_batches` streams rows of `arr_0` straight out of the zip member (stored or deflated), so a
50k x 256 x 256 x 3 reference batch (~10 GB) is never loaded whole. `write_adm_npz` streams batches into
a memory-mapped `.npy` and zips it (ZIP_STORED, zip64), then renames: the file appears complete or not
at all.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

__all__ = ["atomic_save_npz", "npz_array_info", "read_npz_batches", "write_adm_npz"]


def _open_member(zf: zipfile.ZipFile, key: str, path: Path):
    name = f"{key}.npy"
    if name not in zf.namelist():
        raise KeyError(f"{path} has no array {key!r} (it holds {', '.join(n[:-4] for n in zf.namelist())})")
    return zf.open(name)


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def npz_array_info(path: str | Path, key: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array of an `.npz`, read from its header only."""
    path = Path(path)
    with zipfile.ZipFile(path) as zf, _open_member(zf, key, path) as f:
        shape, _, dtype = _read_header(f)
    return shape, dtype


def read_npz_batches(path: str | Path, batch_size: int = 256, key: str = "arr_0") -> Iterator[np.ndarray]:
    """Consecutive row batches of `key` (C-ordered), read incrementally from the archive."""
    path = Path(path)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with zipfile.ZipFile(path) as zf, _open_member(zf, key, path) as f:
        shape, fortran, dtype = _read_header(f)
        if fortran or dtype.hasobject:
            raise ValueError(f"{path}:{key} must be a C-ordered numeric array to be streamed")
        row_shape = shape[1:]
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            buf = f.read(n * row_bytes)
            if len(buf) != n * row_bytes:
                raise ValueError(f"{path}:{key} is truncated at row {start} (expected {shape[0]} rows)")
            yield np.frombuffer(bytearray(buf), dtype=dtype).reshape(n, *row_shape)  # writable


def write_adm_npz(path: str | Path, batches: Iterable[np.ndarray], num_images: int) -> Path:
    """Write `num_images` uint8 NHWC images, given as batches, to an ADM-style `.npz` (`arr_0`), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmpdir:
        npy = Path(tmpdir) / "arr_0.npy"
        out = None
        pos = 0
        for batch in batches:
            batch = np.asarray(batch)
            if batch.dtype != np.uint8 or batch.ndim != 4:
                raise ValueError(f"ADM batches hold uint8 (N, H, W, C) images, got {batch.dtype} {batch.shape}")
            if out is None:
                out = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(num_images, *batch.shape[1:]))
            if pos + len(batch) > num_images:
                raise ValueError(f"more than num_images={num_images} images were given")
            out[pos : pos + len(batch)] = batch
            pos += len(batch)
        if out is None or pos != num_images:
            raise ValueError(f"expected {num_images} images, got {pos}")
        out.flush()
        del out
        tmp_zip = Path(tmpdir) / "out.npz"
        with zipfile.ZipFile(tmp_zip, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.write(npy, arcname="arr_0.npy")
        os.replace(tmp_zip, path)
    return path


def atomic_save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """`np.savez` to a temporary file in the same folder, fsync, rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
