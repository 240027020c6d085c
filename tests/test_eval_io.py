"""ADM .npz reading/writing (streamed), image sources (sample store, folder, npz, dataset) and protocols."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data.sample_store import SampleStore
from eval.io import atomic_save_npz, npz_array_info, read_npz_batches, write_adm_npz
from eval.preprocess import Protocol
from eval.sources import FolderSource, NpzSource, StoreSource, open_source


def _images(n, size=8, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


def test_adm_npz_roundtrip_streams_in_batches(tmp_path):
    images = _images(23)
    path = write_adm_npz(tmp_path / "ref.npz", (images[i : i + 5] for i in range(0, 23, 5)), num_images=23)
    with np.load(path) as data:  # what ADM's evaluator does
        np.testing.assert_array_equal(data["arr_0"], images)
    assert npz_array_info(path) == ((23, 8, 8, 3), np.dtype(np.uint8))
    batches = list(read_npz_batches(path, batch_size=10))
    assert [len(b) for b in batches] == [10, 10, 3]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_reads_compressed_npz_written_by_numpy(tmp_path):
    images = _images(7, channels=1)
    np.savez_compressed(tmp_path / "c.npz", arr_0=images, mu=np.zeros(3))  # ADM reference batches carry mu/sigma
    np.testing.assert_array_equal(np.concatenate(list(read_npz_batches(tmp_path / "c.npz", 3))), images)
    with pytest.raises(KeyError, match="no array 'arr_1'"):
        next(read_npz_batches(tmp_path / "c.npz", key="arr_1"))


def test_write_adm_npz_refuses_bad_input_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="expected 5 images, got 3"):
        write_adm_npz(tmp_path / "x.npz", [_images(3)], num_images=5)
    with pytest.raises(ValueError, match="uint8"):
        write_adm_npz(tmp_path / "x.npz", [_images(3).astype(np.float32)], num_images=3)
    assert list(tmp_path.iterdir()) == []


def test_atomic_save_npz(tmp_path):
    atomic_save_npz(tmp_path / "s.npz", mu=np.arange(3.0), n=np.int64(3))
    with np.load(tmp_path / "s.npz") as data:
        assert data["mu"].tolist() == [0.0, 1.0, 2.0] and int(data["n"]) == 3


def _collect(source, batch_size=4):
    batches = list(source.batches(batch_size))
    return np.concatenate([b[0] for b in batches]), [r for b in batches for r in b[1]]


def test_sources_agree_on_the_same_images(tmp_path):
    images = _images(10)
    store = SampleStore(tmp_path / "store", 10, shard_size=4)
    store.write_layout()
    for s in range(store.num_shards):
        idx = list(store.shard_indices(s))
        store.write_shard(s, images[idx], [{"index": i, "seed": i, "prompt": f"p{i}"} for i in idx])
    (tmp_path / "pngs" / "sub").mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / "pngs" / ("sub" if i % 2 else ".") / f"{i:03d}.png")
    write_adm_npz(tmp_path / "s.npz", [images], 10)

    proto = Protocol()
    sources = [open_source(tmp_path / p, proto) for p in ("store", "pngs", "s.npz")]
    assert [type(s) for s in sources] == [StoreSource, FolderSource, NpzSource]
    for source in sources:
        assert len(source) == 10
    got_store, rec_store = _collect(sources[0])
    np.testing.assert_array_equal(got_store, images)
    assert rec_store[3]["prompt"] == "p3"
    got_folder, rec_folder = _collect(sources[1])  # sorted by path: 000, 002, ... then sub/001, ...
    order = [int(r["path"].rsplit("/", 1)[-1][:3]) for r in rec_folder]
    np.testing.assert_array_equal(got_folder, images[order])
    np.testing.assert_array_equal(_collect(sources[2])[0], images)
    # identities are file-name safe and change when the content may have changed
    ident = sources[2].identity()
    assert ident.startswith("npz-s-") and "/" not in ident
    write_adm_npz(tmp_path / "s.npz", [images[::-1].copy()], 10)
    assert NpzSource(tmp_path / "s.npz", proto).identity() != ident


def test_protocols_resize_and_centre_crop(tmp_path):
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, 10:30] = 255  # the centre 20 x 20 square is white
    assert Protocol("resize", 10).apply_one(wide).shape == (10, 10, 3)
    crop = Protocol("center_crop", 10).apply_one(wide)
    assert crop.shape == (10, 10, 3) and crop.min() == 255  # ADM crop keeps the white centre only
    resized = Protocol("resize", 10).apply_one(wide)
    assert resized[:, 0].max() < 50  # no crop: the black borders are squeezed in
    assert Protocol("resize", 20).apply(np.stack([wide[:, :20]] * 2)).shape == (2, 20, 20, 3)
    assert Protocol().id == "asis" and Protocol("center_crop", 256).id == "admcrop256"
    with pytest.raises(ValueError, match="needs protocol.size"):
        Protocol("resize")
    with pytest.raises(ValueError, match="must be one of"):
        Protocol("squash", 3)


def test_folder_of_mixed_sizes_needs_a_protocol(tmp_path):
    Image.fromarray(_images(1, 8)[0]).save(tmp_path / "a.png")
    Image.fromarray(_images(1, 12)[0]).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="protocol.mode=resize"):
        _collect(FolderSource(tmp_path, Protocol()))
    images, _ = _collect(FolderSource(tmp_path, Protocol("resize", 8)))
    assert images.shape == (2, 8, 8, 3)


def test_missing_or_bad_paths_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="sample folder written by sample.py"):
        open_source(tmp_path / "nothing", Protocol())
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8 images"):
        open_source(tmp_path / "f.npz", Protocol())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        open_source(tmp_path / "empty", Protocol())


def test_a_store_of_videos_is_refused_by_the_image_metrics(tmp_path):
    store = SampleStore(tmp_path / "videos", 2, shard_size=2)  # text-to-video samples (Wan): (n, F, H, W, C)
    store.write_layout()
    store.write_shard(0, np.zeros((2, 5, 8, 8, 3), dtype=np.uint8), [{"index": i, "seed": i} for i in range(2)])
    with pytest.raises(ValueError, match=r"holds videos \(5, 8, 8, 3\).*do not apply"):
        next(open_source(tmp_path / "videos", Protocol()).batches(2))
