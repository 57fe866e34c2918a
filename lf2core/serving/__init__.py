"""Downstream use of a trained lf2 model: the MLflow pyfunc, ONNX export with a parity gate, gallery search.

- ``images``: decode images given as encoded JPEG/PNG bytes or uint8 H x W x 3 arrays, and preprocess
  them exactly as ``evaluate`` does (the recipe's test transform: bicubic resize, ImageNet normalisation).
- ``embedder``: ``EmbeddingModule`` (the evaluated network + horizontal-flip averaging + L2 normalisation
  as one ``nn.Module``: normalised ``[B, 3, H, W]`` -> ``[B, D]``), ``TorchEmbedder`` / ``OnnxEmbedder``
  (images -> embeddings), and ``load_embedder(uri)`` for a registered model (``models:/...``), a stage
  output / checkpoint, or an ``.onnx`` file.
- ``pyfunc``: the MLflow pyfunc flavour's loader module (``_load_pyfunc``): what ``register`` logs and
  ``mlflow models serve`` runs. No mlflow import here; logging lives in ``lf2core.tracking``.
- ``onnx_export``: ``lf2 export --format onnx`` (export, ``onnx.checker``, parity vs PyTorch, ranking
  parity on the target test split, report logged to the registered version).
- ``search``: ``lf2 search`` (faiss top-k over a gallery, on-disk embedding cache, rank-list PNG).

See docs/serving.md.
"""
