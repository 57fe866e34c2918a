"""Training: the mean-teacher step (``step``), the round's seeded loaders (``loaders``), the fine-tuning
round (``finetuner``) and source pretraining (``pretrainer``). The stages ``pretrain_source`` and
``finetune`` read their inputs and write their outputs around these (``lf2core.artifacts``)."""

from .camera_proxy import CameraProxyMemory, CameraProxySettings, camera_proxy_loss
from .finetuner import Finetuner, Round, start_round, train_round
from .loaders import SeededBatchSampler, SeededDataset, round_loaders
from .step import (
    Batch,
    Criteria,
    StepResult,
    StepSettings,
    fast_step,
    ghost_batchnorm,
    global_step,
    lf2_loss,
    make_optimizer,
    reference_step,
    teacher_tail,
)

__all__ = [
    "Batch", "CameraProxyMemory", "CameraProxySettings", "Criteria", "Finetuner", "Round", "SeededBatchSampler",
    "SeededDataset", "StepResult", "StepSettings", "camera_proxy_loss", "fast_step", "ghost_batchnorm",
    "global_step", "lf2_loss", "make_optimizer", "reference_step", "round_loaders", "start_round", "teacher_tail",
    "train_round",
]
