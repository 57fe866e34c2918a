"""Images in, normalised tensors out: the serving side of the recipe's test transform.

An image is given as encoded bytes (JPEG, PNG, anything PIL reads; a base64 string of them, as JSON
carries bytes) or as a uint8 array H x W x 3 (RGB; nested lists of integers in [0, 255] are accepted too,
as JSON gives them). ``to_pil`` decodes one into
a PIL RGB image with the same size limit as the training loaders; ``preprocess`` applies
``lf2core.data.transforms.test_transform`` -- the exact transform ``evaluate`` uses -- and stacks a batch.
Paths are deliberately not accepted here: a served model must not open files named by a client.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any, Sequence

import numpy as np
import torch

from ..data.loaders import MAX_IMAGE_PIXELS
from ..errors import DataError


def to_pil(image: Any, name: str = "image"):
    """A PIL RGB image from encoded bytes or a uint8 H x W x 3 array; ``DataError`` naming ``name``."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, str):  # JSON transports bytes as base64 text (MLflow decodes only some layouts)
        try:
            image = base64.b64decode(image.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise DataError(f"{name}: a string that is not base64; send encoded image bytes (base64 in JSON) "
                            f"or a uint8 H x W x 3 array (paths are not accepted)") from None
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise DataError(f"{name}: empty bytes (expected an encoded JPEG/PNG image)")
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise DataError(f"{name}: image header declares {im.width}x{im.height} pixels, over the "
                                    f"limit of {MAX_IMAGE_PIXELS}")
                return im.convert("RGB")
        except UnidentifiedImageError:
            raise DataError(f"{name}: {len(data)} bytes that are not an image PIL can read (expected encoded "
                            f"JPEG/PNG)") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DataError(f"{name}: cannot decode image bytes ({len(data)} bytes: {e})") from None
    try:
        arr = np.asarray(image)
    except (ValueError, TypeError) as e:
        raise DataError(f"{name}: not an image array ({e})") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(f"{name}: expected encoded bytes or a uint8 array of shape H x W x 3, got "
                        f"{type(image).__name__} of shape {tuple(arr.shape)}")
    if arr.shape[0] < 1 or arr.shape[1] < 1 or arr.shape[0] * arr.shape[1] > MAX_IMAGE_PIXELS:
        raise DataError(f"{name}: array of shape {tuple(arr.shape)} is not a valid image size")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 255:
            raise DataError(f"{name}: array dtype {arr.dtype} with values outside uint8 [0, 255]; send uint8 RGB")
        arr = arr.astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


def preprocess(images: Sequence[Any], height: int, width: int, names: Sequence[str] | None = None) -> torch.Tensor:
    """float32 ``[B, 3, height, width]``: each image decoded (``to_pil``) and test-transformed."""
    from ..data.transforms import test_transform

    if len(images) == 0:
        raise DataError("no images given (expected a batch of at least one image)")
    tf = test_transform(height, width)
    names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
    return torch.stack([tf(to_pil(im, n)) for im, n in zip(images, names)])
