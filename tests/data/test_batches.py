"""Batches from the decoded cache: crops, flips, resizing from the stored size, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bakeoff.data.batches import Batcher


def _images(n=6, side=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def test_eval_batch_is_the_normalised_centre_crop():
    imgs = _images()
    b = Batcher.create(imgs, np.arange(6), 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device("cpu"))
    x = b.eval_batch(np.array([2, 0]))
    expected = (imgs[[2, 0], 4:36, 4:36].astype(np.float32) / 255 - 0.5) / 0.25
    assert x.shape == (2, 3, 32, 32)
    np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_resident_and_memory_mapped_paths_agree(tmp_path):
    path = tmp_path / "c.npy"
    np.save(path, _images())
    mm = np.load(path, mmap_mode="r")
    a = Batcher.create(mm, np.arange(6), 24, (0, 0, 0), (1, 1, 1), torch.device("cpu"), side=28)
    b = Batcher.create(mm, np.arange(6), 24, (0, 0, 0), (1, 1, 1), torch.device("cpu"), max_resident_bytes=0,
                       side=28)
    assert a.resident is not None and b.resident is None
    idx = np.array([5, 1, 3])
    assert torch.equal(a.eval_batch(idx), b.eval_batch(idx))
    pos = a.positions(np.array([0, 5, 1, 3]))  # a whole pass's positions, fetched once
    assert torch.equal(a.eval_batch(idx, pos[1:]), b.eval_batch(idx)) and b.positions(idx) is None
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(a.train_batch(idx, gen_a), b.train_batch(idx, gen_b))


def test_resize_from_stored_size_keeps_the_picture():
    imgs = np.zeros((1, 40, 40, 3), dtype=np.uint8)
    imgs[0, :, :20] = 255  # left half white
    b = Batcher.create(imgs, np.arange(1), 16, (0, 0, 0), (1, 1, 1), torch.device("cpu"), side=20)
    assert b.resident.shape == (1, 20, 20, 3)
    assert b.resident[0, :, :9].min() == 255 and b.resident[0, :, 11:].max() == 0


def test_random_crops_flip_and_stay_in_range():
    imgs = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    imgs[0, :, :16] = 255
    b = Batcher.create(imgs, np.arange(1), 32, (0, 0, 0), (1, 1, 1), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    theta = b.crop_params(400, gen)
    assert (theta[:, 0, 0].abs() <= 1).all() and (theta[:, 1, 1] <= 1).all() and (theta[:, 1, 1] > 0).all()
    flips = (theta[:, 0, 0] < 0).float().mean()
    assert 0.4 < flips < 0.6
    full = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]])  # identity crop
    same = b.train_batch(np.array([0]), theta=full)
    mirrored = b.train_batch(np.array([0]), theta=full * torch.tensor([[[-1.0], [1.0]]]))
    assert same[0, 0, 16, 2] > 0.9 and mirrored[0, 0, 16, 2] < 0.1  # white on the left, then on the right


def test_a_second_size_is_resized_from_kept_images_not_read_again(tmp_path, monkeypatch):
    import bakeoff.data.batches as batches

    rng = np.random.default_rng(0)
    np.save(tmp_path / "c.npy", rng.integers(0, 256, (6, 28, 28, 3), dtype=np.uint8))
    mm = np.load(tmp_path / "c.npy", mmap_mode="r")
    direct = Batcher.create(mm, np.arange(6), 20, (0, 0, 0), (1, 1, 1), torch.device("cpu"), side=24)
    monkeypatch.setattr(batches, "DERIVE_ON", {"cpu"})
    try:
        first = Batcher.create(mm, np.arange(6), 24, (0, 0, 0), (1, 1, 1), torch.device("cpu"), side=28, keep=True)
        first.close()
        derived = Batcher.create(mm, np.arange(6), 20, (0, 0, 0), (1, 1, 1), torch.device("cpu"), side=24, keep=True)
        assert derived.resident.shape == (6, 24, 24, 3)
        assert len(batches._KEPT) == 2  # the stored size stays for the next size
        assert torch.equal(derived.eval_batch(np.array([3, 1])), direct.eval_batch(np.array([3, 1])))
        derived.close()
    finally:
        batches.release_kept()
    assert not batches._KEPT


def test_rows_read_from_the_cache_file_are_the_stored_rows(tmp_path):
    from bakeoff.data.batches import _PinnedRows

    rows = np.random.default_rng(0).integers(0, 256, (2500, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "c.npy", rows)
    images = np.load(tmp_path / "c.npy", mmap_mode="r")
    reader = _PinnedRows(images, 3, 2490, "cpu", rows=1024)
    parts = [reader(slice(i, i + 1024)) for i in range(0, 2490, 1024)]
    reader.close()
    assert [len(p) for p in parts] == [1024, 1024, 442]  # the last chunk stops at the run's end
    assert np.array_equal(torch.cat(parts).numpy(), rows[3:2493])
    with pytest.raises(OSError, match="ends early"):
        _PinnedRows(images, 2000, 1000, "cpu")(slice(0, 1000))
