"""The registered lf2 model as an MLflow pyfunc (loader-module flavour): images in, embeddings out.

``register`` logs the model with ``loader_module="lf2core.serving.pyfunc"`` and a data directory
holding the teacher checkpoint and ``serving.json`` (``embedder.write_model_dir``); ``lf2core`` is
bundled as code, so ``mlflow.pyfunc.load_model`` / ``mlflow models serve`` need no lf2 install.

Input (``predict``): a batch of images, each encoded JPEG/PNG bytes or a uint8 H x W x 3 RGB array, as

- a pandas DataFrame with one column ``image`` (the signature: ``image: binary``; over HTTP the bytes
  are base64 strings, ``{"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]}}`` or
  ``{"dataframe_records": [{"image": "<base64>"}, ...]}``; MLflow decodes them by the signature),
- a dict ``{"image": [...]}``, a list of images, or a uint8 array ``[N, H, W, 3]``.

Output: float32 ``[N, D]``, the L2-normalised, flip-averaged embedding ``evaluate`` measures (squared
Euclidean distance between rows = ``2 - 2 cos``). A bad image raises an error naming its row; the
scoring server answers it with HTTP 400 and that message.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..errors import Lf2Error
from .embedder import TorchEmbedder, load_model_dir

INPUT_COLUMN = "image"
MAX_BATCH = 1024  # images per request: beyond this a client should split its batch


def images_of(model_input: Any) -> list[Any]:
    """The list of images in a pyfunc input (see the module doc); ``Lf2Error`` for another layout."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - mlflow depends on pandas
        pd = None
    if pd is not None and isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN not in model_input.columns:
            raise Lf2Error(f"input has columns {list(model_input.columns)}; expected one column '{INPUT_COLUMN}' "
                           f"of encoded images (base64 in JSON) or uint8 H x W x 3 arrays")
        return list(model_input[INPUT_COLUMN])
    if isinstance(model_input, dict):
        if INPUT_COLUMN not in model_input:
            raise Lf2Error(f"input has keys {sorted(model_input)}; expected '{INPUT_COLUMN}'")
        value = model_input[INPUT_COLUMN]
        return list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    if isinstance(model_input, np.ndarray) and model_input.ndim == 4:
        return list(model_input)
    if isinstance(model_input, (list, tuple)):
        return list(model_input)
    if isinstance(model_input, (bytes, bytearray)) or (isinstance(model_input, np.ndarray) and model_input.ndim == 3):
        return [model_input]
    raise Lf2Error(f"unsupported input {type(model_input).__name__}; expected a DataFrame with column "
                   f"'{INPUT_COLUMN}', a list of images or a uint8 array [N, H, W, 3]")


class ReidPyfunc:
    """What ``mlflow.pyfunc.load_model`` wraps: ``predict(model_input, params=None) -> [N, D]``."""

    def __init__(self, embedder: TorchEmbedder) -> None:
        self.embedder = embedder
        self.meta = embedder.meta

    def predict(self, model_input: Any, params: Optional[dict[str, Any]] = None) -> np.ndarray:
        try:
            images = images_of(model_input)
            if not images:
                raise Lf2Error("no images given (expected a batch of at least one image)")
            if len(images) > MAX_BATCH:
                raise Lf2Error(f"{len(images)} images in one request; at most {MAX_BATCH}, split the batch")
            return self.embedder.embed_images(images)
        except Lf2Error as e:
            from .. import tracking

            raise tracking.invalid_input(f"lf2-reid: {e}") from None


def _load_pyfunc(data_path: str) -> ReidPyfunc:
    """MLflow's entry point for the loader-module flavour (``data_path``: the logged data directory)."""
    return ReidPyfunc(load_model_dir(data_path))
