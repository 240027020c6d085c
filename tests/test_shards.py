"""Webdataset shards: writing (atomic, resumable, byte-reproducible) and reading (resampled training
streams split by rank, finite evaluation streams, captions, skipped and counted corrupt data)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.shard_datamodule import ShardDataModule
from data.shard_decode import SampleDecoder, parse_caption_sources
from data.shard_writer import write_shard
from data.shards import DataConfigError, EvalStream, TrainStream, expand_urls, stream_seed, take
from scripts import make_shards
from tests.shard_data import WORDS, digit_images, write_captioned_digits, write_digit_folder


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> dict:
    """60 digits as 16px PNGs in 4 ImageFolder shards of 16 (the last holds 12)."""
    tmp = tmp_path_factory.mktemp("digits")
    write_digit_folder(tmp / "images", n=60)
    result = make_shards.main(
        ["--input", str(tmp / "images"), "--out", str(tmp / "shards"), "--samples-per-shard", "16"]
    )
    return {**result, "root": tmp}


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def _shard_keys(url: str) -> set[str]:
    return {m.name.split(".")[0] for m in _members(Path(url))}


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def _decoder(**kw) -> SampleDecoder:
    return SampleDecoder(**{"kind": "images", "input_size": 16, "channels": 1, "num_classes": 10, **kw})


# --- writing -----------------------------------------------------------------------------------------
def test_make_shards_imagefolder_holds_every_image_once_with_its_label(digit_shards):
    urls = expand_urls(digit_shards["pattern"])
    assert [Path(u).name for u in urls] == [f"train-{i:06d}.tar" for i in range(4)]
    images, labels = digit_images(60)
    seen = {}
    for url in urls:
        members = _members(Path(url))
        # fixed metadata: byte-reproducible shards
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o444)}
        with tarfile.open(url) as tar:
            for m in members:
                key, ext = m.name.split(".", 1)
                seen.setdefault(key, {})[ext] = tar.extractfile(m).read()
    assert len(seen) == 60 and [len(_members(Path(u))) // 3 for u in urls] == [16, 16, 16, 12]
    for sample in seen.values():
        meta = json.loads(sample["json"])
        i = int(Path(meta["path"]).stem)  # the digit folder names its files by index
        assert int(sample["cls"]) == labels[i] == int(meta["class"])
        assert np.array_equal(np.array(Image.open(io.BytesIO(sample["png"]))), images[i])  # stored as is
    # shards mix classes (shuffled order), the first shard is not one class
    with tarfile.open(urls[0]) as tar:
        first = {tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".cls")}
    assert len(first) > 3


def test_make_shards_interrupted_then_rerun_equals_uninterrupted(tmp_path, monkeypatch):
    write_digit_folder(tmp_path / "images", n=50)
    args = ["--input", str(tmp_path / "images"), "--samples-per-shard", "8", "--seed", "3"]
    make_shards.main([*args, "--out", str(tmp_path / "straight")])

    real, calls = make_shards.sample_members, {"n": 0}

    def dies_in_the_third_shard(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 21:
            raise KeyboardInterrupt  # e.g. Ctrl-C or a node going down mid-shard
        return real(*a, **kw)

    monkeypatch.setattr(make_shards, "sample_members", dies_in_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        make_shards.main([*args, "--out", str(tmp_path / "split")])
    # complete shards only: the interrupted one is neither visible nor left as a temporary file
    assert sorted(p.name for p in (tmp_path / "split").glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert not list((tmp_path / "split").glob(".*"))
    monkeypatch.setattr(make_shards, "sample_members", real)
    rerun = make_shards.main([*args, "--out", str(tmp_path / "split")])
    assert rerun["written"] == 5 and rerun["shards"] == 7
    assert _digest(tmp_path / "split") == _digest(tmp_path / "straight")


def test_a_killed_writer_leaves_no_shard_and_its_leftover_is_cleaned(tmp_path):
    leftover = tmp_path / ".train-000000.tar.abc123.partial"
    leftover.write_bytes(b"half a tar")  # what SIGKILL during a write leaves
    write_shard(tmp_path / "train-000000.tar", [{"__key__": "a", "txt": "hello", "cls": b"3"}])
    assert not leftover.exists()
    assert [m.name for m in _members(tmp_path / "train-000000.tar")] == ["a.cls", "a.txt"]


def test_make_shards_refuses_to_mix_runs_and_names_bad_input(tmp_path):
    write_digit_folder(tmp_path / "images", n=20)
    base = ["--input", str(tmp_path / "images"), "--out", str(tmp_path / "out")]
    make_shards.main([*base, "--samples-per-shard", "8"])
    with pytest.raises(ValueError, match="samples_per_shard"):
        make_shards.main([*base, "--samples-per-shard", "5"])
    (tmp_path / "pairs").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "pairs" / "lonely.png")
    with pytest.raises(ValueError, match=r"no caption \(.txt\) or metadata \(.json\).*lonely.png"):
        make_shards.main(["--layout", "captions", "--input", str(tmp_path / "pairs"), "--out", str(tmp_path / "o2")])


# --- reading: training streams --------------------------------------------------------------------
def test_shard_urls_accept_braces_folders_globs_lists_and_pipes(digit_shards):
    folder = Path(digit_shards["pattern"]).parent
    urls = expand_urls(digit_shards["pattern"])
    assert len(urls) == 4
    assert expand_urls(str(folder)) == urls == expand_urls(str(folder / "train-*.tar"))
    assert expand_urls([urls[0], f"{urls[1]}::{urls[2]}"]) == urls[:3]
    piped = [f"pipe:cat {u}" for u in urls]  # e.g. pipe:aws s3 cp s3://bucket/train-000000.tar -
    assert expand_urls(piped) == piped
    keys = set(_keys(take(TrainStream(piped, _decoder(), 6, shuffle_buffer=0), 20)))
    assert keys == {k for u in urls for k in _shard_keys(u)}  # 120 draws cover all 60 samples
    with pytest.raises(DataConfigError, match="set data.shards"):
        expand_urls("")


def _keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_train_stream_is_a_function_of_its_seed_and_start(digit_shards):
    urls = expand_urls(digit_shards["pattern"])
    make = lambda **kw: TrainStream(urls, _decoder(random_flip=True), 4, shuffle_buffer=10, **kw)
    a, b = take(make(seed=1), 12), take(make(seed=1), 12)
    assert _keys(a) == _keys(b) and all(torch.equal(x["x"], y["x"]) for x, y in zip(a, b))
    assert _keys(take(make(seed=2), 12)) != _keys(a)
    # a run resumed at batch 40 draws a new sequence: it does not replay the first one
    resumed = take(make(seed=1, start_batch=40), 12)
    assert _keys(resumed) != _keys(a)
    assert stream_seed(1, 0, 0, 40, 0) != stream_seed(1, 0, 0, 0, 0)
    # a new epoch of the same stream object continues with fresh randomness
    stream = make(seed=1)
    assert _keys(take(stream, 3)) != _keys(take(stream, 3))
    # endless and resampled: 12 batches of 4 = 48 samples drawn from 60, with augmentation (flips)
    assert all(b["x"].shape == (4, 1, 16, 16) and b["y"].dtype == torch.long for b in a)


def test_ranks_read_disjoint_shards_and_epochs_are_exact(digit_shards):
    urls = expand_urls(digit_shards["pattern"])
    ranks = [TrainStream(urls, _decoder(), 4, rank=r, world_size=2, shuffle_buffer=4) for r in range(2)]
    keys = [set(_keys(take(s, 20))) for s in ranks]
    # rank r reads its own shards (r, r + 2): the ranks never see the same sample
    assert keys[0] == _shard_keys(urls[0]) | _shard_keys(urls[2])
    assert keys[1] == _shard_keys(urls[1]) | _shard_keys(urls[3])
    # a fixed epoch length, split exactly over DataLoader workers: every epoch has the same count
    stream = TrainStream(urls, _decoder(), 4, rank=1, world_size=2, shuffle_buffer=4, epoch_batches=5)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    epochs = [list(loader), list(loader)]
    assert [len(e) for e in epochs] == [5, 5]
    assert {b["data_errors"][0].split(".")[0] for b in epochs[0]} == {"0", "1"}  # both workers contributed
    assert set(_keys(epochs[0] + epochs[1])) <= keys[1]


def test_corrupt_missing_and_undecodable_data_are_skipped_and_counted(digit_shards, tmp_path, caplog):
    good = expand_urls(digit_shards["pattern"])
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(Path(good[0]).read_bytes()[:1500])  # cut in the middle of a member
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file" * 100)
    bad_image = tmp_path / "bad_image.tar"
    write_shard(bad_image, [{"__key__": "x1", "png": b"not a png", "cls": "1"}])
    urls = expand_urls([*good[:2], str(truncated), str(garbage), str(bad_image), str(tmp_path / "missing.tar")])
    assert len(urls) == 6  # the missing shard is kept (and named in a warning), then skipped when drawn
    stream = TrainStream(urls, _decoder(), 4, shuffle_buffer=0)
    batches = take(stream, 40)
    assert len(batches) == 40 and all(len(b["key"]) == 4 for b in batches)
    _, shards, samples = batches[-1]["data_errors"]
    # the unreadable shards, each counted once by name although the stream drew them many times (the
    # truncated one ends early: its cut sample is a bad sample), and the bad samples
    assert set(shards) == {str(garbage), str(tmp_path / "missing.tar")} and samples >= 2
    # the warnings name the shard (and the sample), not a BytesIO object; each one once
    assert caplog.text.count(f"skipped shard {garbage}") == 1
    assert caplog.text.count(f"sample x1 of {bad_image}: UnidentifiedImageError") == 1
    assert f"of {truncated}: " in caplog.text and "BytesIO" not in caplog.text and " at 0x" not in caplog.text
    # nothing readable at all: a clear error instead of spinning forever
    hopeless = TrainStream([str(garbage)], _decoder(), 4, max_consecutive_errors=20)
    with pytest.raises(RuntimeError, match="20 data errors in a row"):
        take(hopeless, 1)
    with pytest.raises(FileNotFoundError, match="none of the 1 shard"):
        expand_urls(str(tmp_path / "nothing-{0..0}.tar"))


def test_data_that_cannot_match_the_config_stops_at_once(tmp_path):
    png = io.BytesIO()
    Image.new("L", (16, 16)).save(png, format="PNG")
    with pytest.raises(DataConfigError, match="data.num_classes=10 but shard samples have no .cls"):
        _decoder()({"__key__": "k", "png": png.getvalue()})
    latent = SampleDecoder("latents", input_size=8, channels=4, num_classes=0)
    buf = io.BytesIO()
    np.save(buf, np.zeros((16, 8, 8), np.float32))
    with pytest.raises(DataConfigError, match=r"latent of shape \(16, 8, 8\).*expects \(4, 8, 8\)"):
        latent({"__key__": "k", "npy": buf.getvalue()})
    with pytest.raises(DataConfigError, match="no mirrored latents"):
        SampleDecoder("latents", input_size=8, channels=16, num_classes=0, random_flip=True)(
            {"__key__": "k", "npy": buf.getvalue()}, rng=_always_flip()
        )
    # such errors are raised through the stream, not skipped
    write_shard(tmp_path / "latents.tar", [{"__key__": "k", "npy": buf.getvalue()}])
    with pytest.raises(DataConfigError):
        take(TrainStream([str(tmp_path / "latents.tar")], latent, 1, shuffle_buffer=0), 1)


class _always_flip:
    def random(self) -> float:
        return 0.0


# --- reading: evaluation streams and captions -------------------------------------------------------
@pytest.mark.parametrize("world", [2, 5])  # 5 ranks > 4 shards: samples are split instead of shards
def test_eval_stream_reads_every_sample_once_over_ranks(digit_shards, world):
    urls = expand_urls(digit_shards["pattern"])
    per_rank = [_keys(list(EvalStream(urls, _decoder(), 7, rank=r, world_size=world))) for r in range(world)]
    flat = [k for keys in per_rank for k in keys]
    assert len(flat) == len(set(flat)) == 60 and all(per_rank)
    assert per_rank == [_keys(list(EvalStream(urls, _decoder(), 7, rank=r, world_size=world))) for r in range(world)]


def test_captions_come_from_the_chosen_sources_at_random(tmp_path):
    write_captioned_digits(tmp_path / "pairs", n=40)
    out = make_shards.main(["--layout", "captions", "--input", str(tmp_path / "pairs"), "--out",
                            str(tmp_path / "shards"), "--samples-per-shard", "10"])  # fmt: skip
    dm = ShardDataModule(out["pattern"], val_shards=out["pattern"], kind="images", image_size=16, channels=3,
                         captions=["txt", "json:short_caption"], batch_size=8, num_workers=0)  # fmt: skip
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (8, 3, 16, 16) and batch["y"].tolist() == [-1] * 8
    captions = [c for b in take(dm.train_stream(), 10) for c in b["caption"]]
    long = [c for c in captions if c.startswith("a handwritten digit")]
    assert long and len(long) < len(captions) and set(captions) - set(long) <= set(WORDS)
    # evaluation is deterministic: the first available source (the .txt, or the .json for every fifth image)
    evals = {k: c for b in dm.val_dataloader() for k, c in zip(b["key"], b["caption"])}
    assert len(evals) == 40
    assert sum(c in WORDS for c in evals.values()) == 8
    with pytest.raises(DataConfigError, match="json:<field>"):
        parse_caption_sources(["caption"])
