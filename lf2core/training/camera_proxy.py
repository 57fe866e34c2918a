"""Camera-aware proxy contrastive loss (``finetune.camera_proxy_weight`` > 0; off by default).

After CAP (Wang et al., AAAI 2021) and PPLR (Cho et al., CVPR 2022): every global pseudo identity is
split by camera into PROXIES, one per (global label, camera) pair present in the round's labels, and the
student's global feature of each image of the global batch is pulled towards its own proxy among the
proxies of its camera (intra-camera term) and towards every proxy of its identity against the hardest
proxies of other identities (inter-camera term), so an identity's images from different cameras end up
close to each other and not only to images of the same camera.

Definitions (P proxies, D feature dimension, proxy p has label ``proxy_label[p]`` and camera
``proxy_cam[p]``; ``t`` = ``camera_proxy_temperature``, ``k`` = ``camera_proxy_negatives``):

- proxy table (``proxy_table``): the sorted distinct (label, camera) pairs of the images with label >= 0;
  ``proxy_of_image[i]`` = the proxy of image i (-1 for label -1: such images are never sampled);
- proxies at the start of a round (``proxy_centres``): m_p = normalize(mean of the features of the images
  of proxy p), features = the teacher's global features f0 (eval mode, no flip, L2-normalised) of the
  target train images (``teacher_global_features``: the finetune stage receives images, labels and the
  model, not the cluster stage's features, so it extracts them once per round with the teacher it starts
  from -- the model that produced the round's clustering features);
- loss of a batch (``camera_proxy_loss``), f_i = normalize(student f0 of image i), s_ip = f_i . m_p / t,
  q_i = proxy of image i, c_i = camera of q_i, y_i = label of q_i:

      intra_i = -log( exp(s_iq_i) / sum_{p: cam(p) = c_i} exp(s_ip) )
      Pos_i   = {p: label(p) = y_i},  Neg_i = the k proxies p with label(p) != y_i of largest s_ip
      inter_i = -1/|Pos_i| sum_{p in Pos_i} log( exp(s_ip) / sum_{u in Pos_i + Neg_i} exp(s_iu) )
      loss    = camera_proxy_weight * (camera_proxy_intra_weight * mean_i intra_i + mean_i inter_i)

  (the memory is a constant of the loss: no gradient flows into it; the choice of Neg_i is not
  differentiated either);
- memory update after every step (``CameraProxyMemory.update``), image by image in batch order,
  ``m = camera_proxy_momentum``: m_q := normalize(m * m_q + (1 - m) * f_i) for q = q_i (CAP's rule: the
  memory follows the current features quickly; 0 = replace by the newest feature).

Data parallel: the loss and the update read the all-gathered global batch (rank order = the one-process
batch), so every rank holds the same memory; the initial proxies are rank 0's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def proxy_table(labels: np.ndarray, camids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The proxies of one round.

    Args:
        labels: int [N] global pseudo labels (-1 = outlier, no proxy).
        camids: int [N] camera of each image.
    Returns:
        (``proxy_of_image`` int64 [N] in 0..P-1 or -1, ``proxy_label`` int64 [P], ``proxy_cam`` int64 [P]),
        the proxies being the distinct (label, camera) pairs sorted by label, then camera.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    camids = np.asarray(camids, dtype=np.int64).reshape(-1)
    if labels.shape != camids.shape:
        raise ValueError(f"proxy_table: {labels.shape[0]} labels for {camids.shape[0]} camera ids")
    keep = labels >= 0
    pairs, inverse = np.unique(np.stack([labels[keep], camids[keep]], axis=1), axis=0, return_inverse=True)
    pairs = pairs.reshape(-1, 2)
    of_image = np.full(labels.shape[0], -1, dtype=np.int64)
    of_image[keep] = np.asarray(inverse, dtype=np.int64).reshape(-1)
    return of_image, pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)


def proxy_centres(features: np.ndarray, proxy_of_image: np.ndarray, num_proxies: int) -> np.ndarray:
    """float32 [P, D]: row p = the L2-normalised mean of ``features`` [N, D] over the images with
    ``proxy_of_image`` == p (images with -1 ignored; every proxy must have an image)."""
    features = np.asarray(features, dtype=np.float64)
    keep = proxy_of_image >= 0
    sums = np.zeros((num_proxies, features.shape[1]))
    np.add.at(sums, proxy_of_image[keep], features[keep])
    counts = np.bincount(proxy_of_image[keep], minlength=num_proxies)
    if (counts == 0).any():
        raise ValueError(f"proxy_centres: {int((counts == 0).sum())} proxies without an image")
    means = sums / counts[:, None]
    return (means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def camera_proxy_loss(
    features: torch.Tensor, proxy_ids: torch.Tensor, proxies: torch.Tensor, proxy_label: torch.Tensor,
    proxy_cam: torch.Tensor, temperature: float, negatives: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean intra-camera term, mean inter-camera term) of a batch (module docstring).

    Args:
        features: [B, D] student global features (any scale: normalised here; float16/bfloat16 computed in
            float32).
        proxy_ids: int64 [B] proxy of each image (>= 0).
        proxies: [P, D] unit rows (the memory; treated as a constant).
        proxy_label, proxy_cam: int64 [P].
        temperature: t > 0; negatives: k >= 0 hardest other-identity proxies in the inter-camera term.
    Returns:
        two scalars with autograd into ``features``.
    """
    if features.dtype in (torch.float16, torch.bfloat16):
        features = features.float()
    f = F.normalize(features, dim=1)
    scores = f @ proxies.detach().to(f.dtype).t() / temperature  # [B, P]
    own_cam = proxy_cam[proxy_ids]  # [B]
    own_label = proxy_label[proxy_ids]
    minus_inf = torch.finfo(scores.dtype).min
    same_cam = proxy_cam[None, :] == own_cam[:, None]  # [B, P]
    own_score = scores.gather(1, proxy_ids[:, None])[:, 0]
    intra = torch.logsumexp(scores.masked_fill(~same_cam, minus_inf), dim=1) - own_score
    pos = proxy_label[None, :] == own_label[:, None]  # [B, P]
    chosen = pos.clone()
    k = min(int(negatives), scores.shape[1])
    if k > 0:
        with torch.no_grad():
            hardest = scores.detach().masked_fill(pos, minus_inf).topk(k, dim=1).indices
        chosen.scatter_(1, hardest, True)  # a pick of a masked entry is a positive, already chosen
    log_prob = scores - torch.logsumexp(scores.masked_fill(~chosen, minus_inf), dim=1, keepdim=True)
    inter = -(log_prob * pos).sum(dim=1) / pos.sum(dim=1)
    return intra.mean(), inter.mean()


@dataclass
class CameraProxySettings:
    """The loss switches (from ``cfg.finetune``); ``weight`` 0 = no camera proxy term at all."""

    weight: float = 0.0
    temperature: float = 0.07
    momentum: float = 0.2
    negatives: int = 50
    intra_weight: float = 1.0

    @classmethod
    def from_config(cls, finetune_cfg: Any) -> "CameraProxySettings":
        return cls(
            weight=float(getattr(finetune_cfg, "camera_proxy_weight", 0.0)),
            temperature=float(getattr(finetune_cfg, "camera_proxy_temperature", 0.07)),
            momentum=float(getattr(finetune_cfg, "camera_proxy_momentum", 0.2)),
            negatives=int(getattr(finetune_cfg, "camera_proxy_negatives", 50)),
            intra_weight=float(getattr(finetune_cfg, "camera_proxy_intra_weight", 1.0)),
        )


class CameraProxyMemory:
    """The proxies of one round and their memory (module docstring).

    ``proxies`` [P, D] float (unit rows), ``proxy_label`` / ``proxy_cam`` int64 [P], ``proxy_of_image``
    int64 [N] (-1: no proxy), all on one device.
    """

    def __init__(self, proxies: torch.Tensor, proxy_label: torch.Tensor, proxy_cam: torch.Tensor,
                 proxy_of_image: torch.Tensor, settings: CameraProxySettings) -> None:
        if proxies.shape[0] != proxy_label.shape[0] or proxy_label.shape != proxy_cam.shape:
            raise ValueError(f"CameraProxyMemory: {proxies.shape[0]} proxies, {proxy_label.shape[0]} labels, "
                             f"{proxy_cam.shape[0]} cameras")
        self.proxies = proxies
        self.proxy_label = proxy_label
        self.proxy_cam = proxy_cam
        self.proxy_of_image = proxy_of_image
        self.settings = settings

    @classmethod
    def build(cls, labels: np.ndarray, camids: np.ndarray, features: Optional[np.ndarray],
              settings: CameraProxySettings, dim: int = 0) -> "CameraProxyMemory":
        """The round's proxies from its global ``labels`` [N], ``camids`` [N] and clustering-side
        ``features`` [N, D] (None: zero proxies of dimension ``dim``, to be filled by ``load_state_dict``)."""
        of_image, plabel, pcam = proxy_table(labels, camids)
        if features is None:
            cent = np.zeros((len(plabel), dim), np.float32)
        else:
            if len(features) != len(of_image):
                raise ValueError(f"CameraProxyMemory.build: {len(features)} feature rows for {len(of_image)} labels")
            cent = proxy_centres(features, of_image, len(plabel))
        return cls(torch.from_numpy(cent), torch.from_numpy(plabel), torch.from_numpy(pcam),
                   torch.from_numpy(of_image), settings)

    @property
    def num_proxies(self) -> int:
        return int(self.proxies.shape[0])

    def to(self, device: Any, dtype: Optional[torch.dtype] = None) -> "CameraProxyMemory":
        """Moved in place (and returned); ``dtype`` casts the proxies."""
        self.proxies = self.proxies.to(device=device, dtype=dtype or self.proxies.dtype)
        self.proxy_label, self.proxy_cam = self.proxy_label.to(device), self.proxy_cam.to(device)
        self.proxy_of_image = self.proxy_of_image.to(device)
        return self

    def ids(self, index: torch.Tensor) -> torch.Tensor:
        """int64 [B] proxy of each dataset ``index`` [B]; ValueError for an image without one (label -1)."""
        ids = self.proxy_of_image[index.to(self.proxy_of_image.device)]
        if bool((ids < 0).any()):
            raise ValueError("camera proxy: a batch holds an image with global label -1 (never sampled)")
        return ids

    def loss(self, features: torch.Tensor, proxy_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(``weight * (intra_weight * intra + inter)``, detached terms ``cam_proxy_intra``,
        ``cam_proxy_inter``) of ``features`` [B, D] with proxies ``proxy_ids`` [B]."""
        s = self.settings
        intra, inter = camera_proxy_loss(features, proxy_ids, self.proxies, self.proxy_label, self.proxy_cam,
                                         s.temperature, s.negatives)
        total = s.weight * (s.intra_weight * intra + inter)
        return total, {"cam_proxy_intra": intra.detach(), "cam_proxy_inter": inter.detach()}

    @torch.no_grad()
    def update(self, features: torch.Tensor, proxy_ids: torch.Tensor) -> None:
        """``m_q := normalize(m * m_q + (1 - m) * normalize(f_i))``, image by image in batch order."""
        m = self.settings.momentum
        f = F.normalize(features.detach().to(self.proxies.dtype), dim=1)
        for i, q in enumerate(proxy_ids.tolist()):
            self.proxies[q] = F.normalize(m * self.proxies[q] + (1.0 - m) * f[i], dim=0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The resumable part: the memory (CPU copy) and the proxy table it belongs to."""
        return {"proxies": self.proxies.detach().cpu().clone(), "proxy_label": self.proxy_label.cpu().clone(),
                "proxy_cam": self.proxy_cam.cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore ``state_dict()``; ValueError when it belongs to another proxy table."""
        if not (torch.equal(state["proxy_label"].cpu(), self.proxy_label.cpu())
                and torch.equal(state["proxy_cam"].cpu(), self.proxy_cam.cpu())):
            raise ValueError("camera proxy memory of the training state belongs to other labels")
        self.proxies = state["proxies"].to(device=self.proxies.device, dtype=self.proxies.dtype).clone()


# finetune.camera_proxy_weight > 0: the round's memory and the proxy id [B] of each image of the global batch
CamProxy = Optional[tuple[CameraProxyMemory, torch.Tensor]]


def add_camera_proxy_loss(loss: torch.Tensor, terms: dict[str, torch.Tensor], cam_proxy: CamProxy,
                          global_feat: torch.Tensor) -> torch.Tensor:
    """``loss`` + the camera proxy loss of the global batch's ``global_feat`` [B, D] (its detached terms
    are added to ``terms``); ``loss`` itself when ``cam_proxy`` is None."""
    if cam_proxy is None:
        return loss
    extra, more = cam_proxy[0].loss(global_feat, cam_proxy[1])
    terms.update(more)
    return loss + extra


def update_camera_proxy(cam_proxy: CamProxy, global_feat: torch.Tensor) -> None:
    """The memory update with the step's global features [B, D] (no-op when ``cam_proxy`` is None)."""
    if cam_proxy is not None:
        cam_proxy[0].update(global_feat.detach(), cam_proxy[1])


def teacher_global_features(mt: Any, samples: Sequence[Any], height: int, width: int, batch_size: int,
                            device: Any, num_workers: int = 0, amp: bool = True) -> np.ndarray:
    """float32 [N, C]: the teacher's L2-normalised global feature f0 (eval mode, no flip) of every sample,
    in order (``lf2core.features.extract``). Restores the teacher's train/eval mode."""
    from ..data.loaders import test_loader
    from ..data.transforms import test_transform
    from ..features import extract

    loader = test_loader(list(samples), test_transform(height, width), batch_size, num_workers)
    was_training = mt.teacher.training
    mt.teacher.eval()
    try:
        out = extract(lambda x: mt.teacher.features(x, attention=False).global_feat, loader, device, flip=False,
                      amp=amp, desc="camera proxies")
    finally:
        mt.teacher.train(was_training)
    return out["features"]
