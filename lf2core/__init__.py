"""lf2: LF2 unsupervised domain adaptive person re-identification (training library).

The library never imports kfp; MLflow and boto3 are only reached through ``lf2core.tracking`` and
``lf2core.storage`` so everything runs without a server.
"""

__version__ = "0.1.0"
