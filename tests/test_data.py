"""DataModules: the bundled digits, ImageFolder, the resumable infinite sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data.digits import DigitsDataModule, load_digits_tensors
from data.imagefolder import ImageFolderDataModule, count_class_folders
from data.sampling import InfiniteBatchSampler
from data.transforms import center_crop_arr, to_model_range, to_uint8


def test_digits_are_real_scaled_and_split():
    x, y = load_digits_tensors(16)
    assert x.shape == (1797, 1, 16, 16) and y.shape == (1797,)
    assert x.min() == -1 and x.max() == 1
    assert sorted(y.unique().tolist()) == list(range(10))
    dm = DigitsDataModule(image_size=16, batch_size=32, val_fraction=0.1, seed=0)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 1797
    assert abs(len(dm.val_set) - 180) <= 1
    # stratified: every class in the held-out split
    assert set(dm.val_set.labels.tolist()) == set(range(10))
    # held-out images are not in the training set
    train_flat = dm.train_set.images.flatten(1)
    val_flat = dm.val_set.images.flatten(1)
    assert torch.cdist(val_flat[:20], train_flat).min(dim=1).values.gt(0).all()
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (32, 1, 16, 16) and batch["y"].dtype == torch.long
    assert dm.decode(batch["x"]) is batch["x"]


def test_digits_bad_settings_are_clear():
    with pytest.raises(ValueError, match="power of two"):
        load_digits_tensors(12)
    with pytest.raises(ValueError, match="10 classes"):
        DigitsDataModule(num_classes=7)
    with pytest.raises(ValueError, match="input_size"):
        DigitsDataModule(image_size=16, input_size=8)


def test_infinite_sampler_is_a_function_of_the_batch_index():
    s = InfiniteBatchSampler(100, 8, seed=3)
    it = iter(s)
    first = [next(it) for _ in range(30)]  # spans several passes (12 batches per pass)
    assert first == [s.batch(g) for g in range(30)]
    resumed = iter(InfiniteBatchSampler(100, 8, seed=3, start_batch=17))
    assert [next(resumed) for _ in range(13)] == first[17:]
    # one pass visits 96 distinct samples; the next pass is a new permutation
    assert len({i for b in first[:12] for i in b}) == 96
    assert first[:12] != first[12:24]


def test_infinite_sampler_ranks_are_disjoint_and_in_step():
    ranks = [InfiniteBatchSampler(103, 4, seed=0, rank=r, world_size=3) for r in range(3)]
    assert len({s.batches_per_pass for s in ranks}) == 1
    for g in range(ranks[0].batches_per_pass):
        seen = [set(s.batch(g)) for s in ranks]
        assert not (seen[0] & seen[1] or seen[1] & seen[2] or seen[0] & seen[2])
    with pytest.raises(ValueError, match="cannot fill one batch"):
        InfiniteBatchSampler(10, 8, world_size=2)


def test_center_crop_matches_adm():
    img = Image.fromarray(np.arange(300 * 200 * 3, dtype=np.uint8).reshape(200, 300, 3))
    out = center_crop_arr(img, 64)
    assert out.shape == (64, 64, 3)
    # ADM: box-halve while >= 2x (200 -> 100), bicubic to short side 64 (150x100 -> 96x64), centre crop
    half = img.resize((150, 100), resample=Image.BOX).resize((96, 64), resample=Image.BICUBIC)
    np.testing.assert_array_equal(out, np.array(half)[:, 16:80])
    x = to_model_range(out)
    assert x.shape == (3, 64, 64) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(to_uint8(x), torch.from_numpy(np.ascontiguousarray(out)))


def _write_folder(root, classes=("cat", "dog", "fox"), per_class=4, size=(40, 30)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def test_imagefolder_datamodule(tmp_path):
    root = _write_folder(tmp_path / "imgs")
    assert count_class_folders(str(root)) == 3
    dm = ImageFolderDataModule(str(root), image_size=16, batch_size=4, val_fraction=0.25, num_workers=0)
    assert dm.num_classes == 3 and dm.classes == ["cat", "dog", "fox"]
    dm.setup()
    assert len(dm.train_set) == 9 and len(dm.val_set) == 3
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (4, 3, 16, 16) and batch["x"].min() >= -1
    assert set(batch["y"].tolist()) <= {0, 1, 2}


def test_imagefolder_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ImageFolderDataModule(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataModule(str(tmp_path / "empty"))
    root = _write_folder(tmp_path / "imgs")
    with pytest.raises(ValueError, match=r"set data\.num_classes=3"):
        ImageFolderDataModule(str(root), num_classes=5)
