"""Transforms vs an independent NumPy/PIL reference: the test transform exactly; every train output must be
one of the 21 x 21 x 2 (crop offset x flip) candidates of the padded resized image, with random erasing
filling one rectangle (2%-40% of the area) with the ImageNet mean values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lf2core.data import transforms as T

MEAN = np.array(T.IMAGENET_MEAN, dtype=np.float32)[:, None, None]
STD = np.array(T.IMAGENET_STD, dtype=np.float32)[:, None, None]
H, W = 32, 16


def source_image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (45, 23, 3), dtype=np.uint8))  # odd size: really resized


def reference_normalise(arr_hwc: np.ndarray) -> np.ndarray:
    return (arr_hwc.transpose(2, 0, 1).astype(np.float32) / 255.0 - MEAN) / STD


def resized(img: Image.Image) -> np.ndarray:
    return np.asarray(img.resize((W, H), Image.BICUBIC))


def candidates(img: Image.Image) -> np.ndarray:
    """All train outputs without erasing: [2 flips, 21, 21, 3, H, W]."""
    out = []
    for flip in (False, True):
        a = resized(img)
        if flip:
            a = a[:, ::-1]
        padded = reference_normalise(np.pad(a, ((10, 10), (10, 10), (0, 0))))
        win = np.lib.stride_tricks.sliding_window_view(padded, (H, W), axis=(1, 2))  # [3, 21, 21, H, W]
        out.append(win.transpose(1, 2, 0, 3, 4))
    return np.stack(out)


def test_test_transform_matches_reference() -> None:
    img = source_image()
    x = T.test_transform(H, W)(img)
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and tuple(x.shape) == (3, H, W)
    np.testing.assert_allclose(x.numpy(), reference_normalise(resized(img)), atol=1e-5)


def test_train_transform_is_a_flip_and_crop_of_the_padded_image() -> None:
    img = source_image(1)
    cands = candidates(img)
    tf = T.train_transform(H, W)
    flips, offsets = [], set()
    torch.manual_seed(0)
    for _ in range(40):
        x = tf(img).numpy()
        assert x.shape == (3, H, W) and x.dtype == np.float32
        err = np.abs(cands - x).max(axis=(3, 4, 5))  # [2, 21, 21]
        f, dy, dx = np.unravel_index(np.argmin(err), err.shape)
        assert err[f, dy, dx] < 1e-5, "output is not a flip + crop of the padded resized image"
        flips.append(f)
        offsets.add((dy, dx))
    assert 8 <= sum(flips) <= 32  # p = 0.5
    assert len(offsets) > 10  # the crop really moves


def test_random_erasing_fills_a_rectangle_with_the_mean() -> None:
    img = source_image(2)
    cands = candidates(img)
    tf = T.train_transform(H, W, random_erasing=1.0)
    torch.manual_seed(1)
    erased = 0
    for _ in range(30):
        x = tf(img).numpy()
        mask = np.all(np.abs(x - MEAN) < 1e-7, axis=0)  # [H, W] pixels equal to the raw mean values
        if not mask.any():
            continue  # torchvision gives up after 10 tries that do not fit
        erased += 1
        ys, xs = np.nonzero(mask)
        box = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
        assert box.all(), "erased region is a rectangle"
        assert 0.02 * H * W * 0.5 <= box.size <= 0.4 * H * W * 1.5  # area range, rounding slack
        # outside the rectangle the image is one of the flip + crop candidates
        err = np.abs(cands - x)[..., ~mask].max(axis=-1).max(axis=-1)
        assert err.min() < 1e-5
    assert erased >= 25


def test_no_erasing_by_default_and_bad_probability() -> None:
    names = [type(t).__name__ for t in T.train_transform(H, W).transforms]
    assert "RandomErasing" not in names
    names = [type(t).__name__ for t in T.train_transform(H, W, 0.5).transforms]
    assert names[-1] == "RandomErasing"
    with pytest.raises(ValueError):
        T.train_transform(H, W, 1.5)
