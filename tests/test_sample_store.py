"""The on-disk sample format: atomic shards, resumable, rank split without duplicates, ADM export."""

from __future__ import annotations

import numpy as np
import pytest

from data.sample_store import SampleStore, shards_for_rank


def _images(indices, size=4, channels=3):
    return np.stack([np.full((size, size, channels), i % 256, dtype=np.uint8) for i in indices])


def _records(indices):
    return [{"index": i, "seed": 100 + i, "label": i % 3} for i in indices]


@pytest.mark.parametrize("fmt", ["npz", "png"])
def test_write_read_and_resume(tmp_path, fmt):
    store = SampleStore(tmp_path / "s", num_samples=10, shard_size=4, image_format=fmt)
    store.write_layout()
    assert store.num_shards == 3 and list(store.shard_indices(2)) == [8, 9]
    assert store.missing_shards() == [0, 1, 2]
    for shard in (0, 2):
        idx = list(store.shard_indices(shard))
        store.write_shard(shard, _images(idx), _records(idx))
    assert store.missing_shards() == [1]
    with pytest.raises(FileNotFoundError, match="1 of 3 shards missing"):
        next(SampleStore.open(tmp_path / "s").iter_batches())
    idx = list(store.shard_indices(1))
    store.write_shard(1, _images(idx), _records(idx))
    reopened = SampleStore.open(tmp_path / "s")
    batches = list(reopened.iter_batches(batch_size=3))
    images = np.concatenate([b[0] for b in batches])
    records = [r for b in batches for r in b[1]]
    assert [r["index"] for r in records] == list(range(10))
    np.testing.assert_array_equal(images, _images(range(10)))
    out = reopened.export_adm_npz(tmp_path / "samples.npz")
    with np.load(out) as data:
        np.testing.assert_array_equal(data["arr_0"], _images(range(10)))


def test_layout_cannot_change_under_existing_samples(tmp_path):
    SampleStore(tmp_path, 10, 4).write_layout()
    with pytest.raises(ValueError, match="already holds samples"):
        SampleStore(tmp_path, 10, 5).write_layout()
    with pytest.raises(FileNotFoundError, match="no store.json"):
        SampleStore.open(tmp_path / "elsewhere")


def test_bad_shards_are_refused(tmp_path):
    store = SampleStore(tmp_path, 10, 4)
    with pytest.raises(ValueError, match="uint8 images"):
        store.write_shard(0, np.zeros((4, 4, 4, 3), dtype=np.float32), _records(range(4)))
    with pytest.raises(ValueError, match="indices 0..3"):
        store.write_shard(0, _images(range(4)), _records(range(1, 5)))


def test_ranks_cover_every_shard_once():
    world = 3
    owned = [s for r in range(world) for s in shards_for_rank(10, r, world)]
    assert sorted(owned) == list(range(10))


@pytest.mark.parametrize("fmt", ["npz", "png"])
def test_videos_are_stored_frame_by_frame(tmp_path, fmt):
    """Text-to-video samples (Wan): uint8 (n, F, H, W, C); png: a folder of frames per sample."""
    videos = np.random.default_rng(0).integers(0, 256, size=(3, 5, 4, 6, 3), dtype=np.uint8)
    store = SampleStore(tmp_path / "v", num_samples=3, shard_size=2, image_format=fmt)
    store.write_layout()
    store.write_shard(0, videos[:2], _records(range(2)))
    store.write_shard(1, videos[2:], _records(range(2, 3)))
    images, records = next(SampleStore.open(tmp_path / "v").iter_batches(batch_size=8))
    np.testing.assert_array_equal(images, videos[:2])
    assert [r["index"] for r in records] == [0, 1]
    if fmt == "png":
        assert sorted(p.name for p in (tmp_path / "v/shards/00000002/00000002").iterdir()) == [
            f"{f:04d}.png" for f in range(5)
        ]
    with pytest.raises(ValueError, match=r"videos \(2, F, H, W, C\)"):
        store.write_shard(0, videos[:2, 0, 0], _records(range(2)))
