"""The method variants: what differs between LF2 and its baselines, as small objects.

A variant answers the few questions where the methods differ; everything else (the step, the loaders,
the stages) is shared:

- ``label_sets``: the pseudo-label sets a round trains with, one identity-balanced batch each per step
  (``lf2``: ``global``, ``upper``, ``lower``; ``mt_global``: ``global`` only -- one mean teacher on the
  global feature, the MMT-style baseline);
- ``num_parts``: the part count the variant's label sets need from the model (None: any);
- ``test_feature(net, x)``: the evaluated feature of an eval-mode network, ``x`` [B,3,H,W] -> [B,D]
  (``lf2`` and ``source``: the network's own eval forward, normalize(cat[f0, .., fK]) for an
  ``LF2Model``; ``mt_global``: normalize(f0)).

``source`` (a pretrain output) is evaluated and registered but never fine-tuned (``trainable`` False).
The variant of a fine-tuned model is recorded in its checkpoints (``variant``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

LABEL_SETS = ("global", "upper", "lower")


@dataclass(frozen=True)
class Variant:
    name: str
    label_sets: tuple[str, ...]
    num_parts: Optional[int]
    global_only: bool  # evaluated on the global feature alone
    trainable: bool = True

    def num_batches(self, num_parts: int) -> int:
        """Batches per step: one per trained label set (1 + K for LF2 with K parts, 1 for ``mt_global``)."""
        return 1 + num_parts if self.num_parts is not None else len(self.label_sets)

    def test_feature(self, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.global_only:
            return F.normalize(net.features(x).global_feat, dim=1)
        return net(x)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("lf2", LABEL_SETS, num_parts=2, global_only=False),
        Variant("mt_global", LABEL_SETS[:1], num_parts=None, global_only=True),
        Variant("source", (), num_parts=None, global_only=False, trainable=False),
    )
}
TRAINABLE = tuple(name for name, v in VARIANTS.items() if v.trainable)


def get_variant(name: str, *, trainable: bool = True) -> Variant:
    """The variant called ``name``; ``ValueError`` naming the config key for an unknown (or, with
    ``trainable``, a non-trainable) one."""
    v = VARIANTS.get(name)
    if v is None or (trainable and not v.trainable):
        raise ValueError(f"config key 'finetune.variant': {name!r} is not one of {list(TRAINABLE)}")
    return v
