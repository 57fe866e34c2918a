"""LF2 networks: backbones, the source model, the LF2 target model with Fuse, and the mean teacher.

No file I/O here: stage outputs are read and written with ``lf2core.artifacts``."""

from .backbone import ARCHS, build_backbone
from .lf2 import ChannelAttention, Fuse, LF2Model, LF2Output, build_student, set_bn_eval
from .source import SourceModel
from .teacher import MeanTeacher, build_target_model, load_mean_teacher

__all__ = [
    "ARCHS",
    "build_backbone",
    "ChannelAttention",
    "Fuse",
    "LF2Model",
    "LF2Output",
    "SourceModel",
    "MeanTeacher",
    "build_student",
    "build_target_model",
    "load_mean_teacher",
    "set_bn_eval",
]
