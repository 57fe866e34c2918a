"""IdentityBatchSampler: P x K structure, maximal camera diversity (vs brute force), determinism,
outliers never sampled, balanced identity coverage. ReleasedBatchSampler (the released code's sampling):
anchor + other-camera companions, replacement rule, one-image identities, batches cut from the flat list."""

from __future__ import annotations

import itertools
import logging
from collections import Counter

import numpy as np
import pytest
import torch

from lf2core.data.samplers import SAMPLERS, IdentityBatchSampler, ReleasedBatchSampler, batch_sampler
from lf2core.errors import DataError


def make_labels(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A varied set: identities with 1..9 images over 1..5 cameras, plus outliers (-1)."""
    rng = np.random.default_rng(seed)
    labels, camids = [], []
    for ident in range(23):
        n = int(rng.integers(1, 10))
        n_cams = int(rng.integers(1, 6))
        cams = rng.integers(0, 8, size=n_cams)
        labels += [ident * 3] * n  # non-contiguous labels
        camids += list(rng.choice(cams, size=n))
    labels += [-1] * 15
    camids += list(rng.integers(0, 8, size=15))
    perm = rng.permutation(len(labels))  # identities interleaved in the dataset order
    return np.asarray(labels)[perm], np.asarray(camids)[perm]


def brute_force_max_cameras(cams: list[int], k: int) -> int:
    """Most distinct cameras any choice of min(k, n) different images of the identity can cover."""
    m = min(k, len(cams))
    return max(len(set(c)) for c in itertools.combinations(cams, m))


@pytest.mark.parametrize("batch_size, k", [(16, 4), (12, 3), (10, 5)])
def test_batches_are_p_by_k_with_maximal_camera_diversity(batch_size: int, k: int) -> None:
    labels, camids = make_labels()
    sampler = IdentityBatchSampler(labels, camids, batch_size, k, num_batches=40, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 40
    p = batch_size // k
    for batch in batches:
        assert len(batch) == p * k
        assert all(0 <= i < len(labels) for i in batch)
        per_id: dict[int, list[int]] = {}
        for i in batch:
            per_id.setdefault(int(labels[i]), []).append(i)
        assert len(per_id) == p, "P distinct identities"
        for ident, idx in per_id.items():
            assert ident >= 0, "outliers are never sampled"
            assert len(idx) == k
            own = np.flatnonzero(labels == ident)
            assert set(idx) <= set(own.tolist())
            if len(own) >= k:
                assert len(set(idx)) == k, "no repeated image while the identity has K of them"
            else:
                assert set(idx) == set(own.tolist()), "all images used before any repeat"
            best = brute_force_max_cameras([int(camids[i]) for i in own], k)
            assert len({int(camids[i]) for i in idx}) == best


def test_deterministic_for_a_seed_and_epochs_differ() -> None:
    labels, camids = make_labels()
    a = IdentityBatchSampler(labels, camids, 16, 4, num_batches=25, seed=7)
    b = IdentityBatchSampler(labels, camids, 16, 4, num_batches=25, seed=7)
    c = IdentityBatchSampler(labels, camids, 16, 4, num_batches=25, seed=8)
    first = list(a)
    assert first == list(b)
    assert first != list(c)
    second = list(a)  # the next epoch
    assert second != first
    a.set_epoch(0)
    assert list(a) == first
    assert list(a) == second


def test_identities_are_balanced() -> None:
    labels, camids = make_labels(1)
    n_ids = len(set(labels[labels >= 0].tolist()))
    sampler = IdentityBatchSampler(labels, camids, 28, 4, num_batches=1, seed=0)
    for num_batches in (1, 3, 10, 37):
        sampler.num_batches = num_batches
        sampler.set_epoch(num_batches)
        counts = Counter()
        for batch in sampler:
            counts.update({int(labels[i]) for i in batch})
        seen = [counts.get(ident, 0) for ident in sorted(set(labels[labels >= 0].tolist()))]
        assert len(seen) == n_ids
        assert max(seen) - min(seen) <= 1, (num_batches, seen)


def test_outliers_never_sampled_and_all_outliers_rejected() -> None:
    labels = np.array([-1, 0, 0, -1, 1, 1, -1, 2, 2])
    camids = np.array([0, 0, 1, 1, 0, 1, 0, 1, 0])
    batches = list(IdentityBatchSampler(labels, camids, 4, 2, num_batches=30, seed=0))
    used = {i for b in batches for i in b}
    assert used == {1, 2, 4, 5, 7, 8}
    with pytest.raises(DataError, match="at least 2"):
        IdentityBatchSampler(np.array([-1, 5, 5, -1]), np.zeros(4), 4, 2, 3, 0)


def test_fewer_identities_than_p_uses_all(caplog: pytest.LogCaptureFixture) -> None:
    labels = np.array([0, 0, 0, 1, 1, 2])
    camids = np.array([0, 1, 2, 0, 0, 3])
    with caplog.at_level(logging.WARNING):
        sampler = IdentityBatchSampler(labels, camids, 16, 2, num_batches=5, seed=0)
    assert "only 3 identities" in caplog.text
    for batch in sampler:
        assert sorted(Counter(int(labels[i]) for i in batch).values()) == [2, 2, 2]


def test_bad_arguments() -> None:
    with pytest.raises(DataError, match="2 labels but 3 camids"):
        IdentityBatchSampler([0, 1], [0, 0, 0], 4, 2, 1, 0)
    with pytest.raises(DataError, match="batch_size"):
        IdentityBatchSampler([0, 1], [0, 0], 2, 4, 1, 0)
    with pytest.raises(DataError, match="num_batches"):
        IdentityBatchSampler([0, 1], [0, 0], 4, 2, 0, 0)


# ----------------------------------------------------------------------------------------- loaders
def _samples(tmp_path, n_ids: int = 5, per_id: int = 3):
    from PIL import Image

    from lf2core.data.datasets import Sample

    out = []
    for pid in range(n_ids):
        for j in range(per_id):
            p = tmp_path / f"{pid:04d}_c{j + 1}s1_{j:06d}_00.png"
            # each image is filled with its own value so a loaded item can be traced back to its file
            Image.new("RGB" if j else "L", (4, 8), (10 * pid + j,) * (3 if j else 1)).save(p)
            out.append(Sample(str(p), 100 + pid, j))
    return out


def test_image_dataset_items(tmp_path) -> None:
    from lf2core.data.loaders import ImageDataset

    samples = _samples(tmp_path)
    to_array = lambda im: torch.from_numpy(np.asarray(im).copy())  # noqa: E731
    ds = ImageDataset(samples, to_array)
    img, label, camid, index = ds[4]
    assert (label, camid, index) == (101, 1, 4)
    assert img.shape == (8, 4, 3) and int(img[0, 0, 0]) == 11  # grey images are converted to RGB
    assert ds[3][0].shape == (8, 4, 3)
    ds = ImageDataset(samples, to_array, labels=np.arange(len(samples)) * 2)
    assert ds[4][1] == 8
    with pytest.raises(DataError, match="3 labels for 15 samples"):
        ImageDataset(samples, None, labels=[0, 1, 2])
    (tmp_path / "0000_c1s1_000000_00.png").write_bytes(b"broken")
    with pytest.raises(DataError, match=r"0000_c1s1_000000_00\.png: cannot read image"):
        ImageDataset(samples, None)[0]


def test_train_and_test_loaders(tmp_path) -> None:
    from lf2core.data import loaders
    from lf2core.data.transforms import test_transform as eval_tf

    samples = _samples(tmp_path)
    labels = np.array([0, 0, 0, 1, 1, 1, -1, -1, -1, 2, 2, 2, 3, 3, 3])
    loader = loaders.train_loader(samples, labels, eval_tf(8, 4), batch_size=6, num_instances=2,
                                  num_batches=4, seed=0, num_workers=0)
    assert len(loader) == 4
    expected = list(IdentityBatchSampler(labels, [s.camid for s in samples], 6, 2, 4, 0))
    batches = list(loader)
    for (imgs, lab, cam, idx), want in zip(batches, expected):
        assert imgs.shape == (6, 3, 8, 4) and imgs.dtype == torch.float32
        assert idx.tolist() == want
        assert lab.tolist() == labels[want].tolist() and cam.tolist() == [samples[i].camid for i in want]
        assert -1 not in lab.tolist()
    assert not loader.persistent_workers and loader.pin_memory == torch.cuda.is_available()
    # labels=None -> pids relabelled to 0..n-1
    loader = loaders.train_loader(samples, None, eval_tf(8, 4), 4, 2, 2, seed=0, num_workers=0)
    _, lab, _, idx = next(iter(loader))
    assert lab.tolist() == [samples[i].pid - 100 for i in idx.tolist()]

    loader = loaders.test_loader(samples, eval_tf(8, 4), batch_size=4, num_workers=0)
    got = [b for b in loader]
    assert [len(b[3]) for b in got] == [4, 4, 4, 3]
    assert torch.cat([b[3] for b in got]).tolist() == list(range(15))
    assert torch.cat([b[1] for b in got]).tolist() == [s.pid for s in samples]


# ----------------------------------------------------------------------------------------- released
def released_case() -> tuple[np.ndarray, np.ndarray]:
    """Hand-built identities (K = 4), dataset order interleaved:
    label 0: cameras 0,1,2,3 (3 other-camera images whatever the anchor: < K, drawn WITH replacement);
    label 1: one image (emits the anchor alone);
    label 2: three images, all camera 0 (no other camera: companions from its 2 other images);
    label 3: cameras 0,0,1,1,1,1,1,1 (anchor on camera 0: 6 candidates >= K, no replacement);
    label -1: two outliers (never sampled)."""
    labels = [0, 1, 2, 3, 0, 2, 3, 0, 3, 2, 3, 0, 3, 3, 3, 3, -1, -1]
    cams = [0, 5, 0, 0, 1, 0, 0, 2, 1, 0, 1, 3, 1, 1, 1, 1, 0, 1]
    return np.asarray(labels), np.asarray(cams)


def split_groups(flat: list[int], labels: np.ndarray) -> list[list[int]]:
    """Cut a flat index list into runs of one label (the sampler's per-identity groups)."""
    groups: list[list[int]] = []
    for i in flat:
        if groups and labels[groups[-1][0]] == labels[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def test_released_groups_anchor_plus_other_cameras() -> None:
    labels, cams = released_case()
    s = ReleasedBatchSampler(labels, cams, batch_size=8, num_instances=4, num_batches=1, seed=3)
    assert s.pass_length == 1 + 3 * 4  # the one-image identity contributes one image
    rng = np.random.default_rng(0)
    dup = {0: 0, 1: 0, 2: 0, 3: 0}
    for _ in range(300):
        groups = split_groups(s.one_pass(rng), labels)
        assert sorted(int(labels[g[0]]) for g in groups) == [0, 1, 2, 3]  # each identity once per pass
        for g in groups:
            ident, anchor, comp = int(labels[g[0]]), g[0], g[1:]
            assert all(labels[i] == ident for i in g)
            assert len(g) == (1 if ident == 1 else 4)
            if ident in (0, 3):  # companions from the anchor's OTHER cameras
                assert all(cams[i] != cams[anchor] for i in comp)
            if ident == 2:  # a single camera: the other images, never the anchor itself
                assert anchor not in comp
            dup[ident] += len(set(comp)) < len(comp)
            if ident == 3 and cams[anchor] == 0:
                assert len(set(comp)) == 3  # 6 candidates >= K: without replacement
    # 3 candidates < K: with replacement (P(no repeat in 3 draws from 3) = 2/9 per pass)
    assert dup[0] > 100 and dup[2] > 100


def test_released_batches_are_the_flat_list_cut_in_order() -> None:
    """Batches = consecutive slices of each pass's flat list; the tail of a pass (13 % 8 = 5 images) is
    dropped and the next pass starts a new batch; nothing is P x K aligned."""
    labels, cams = released_case()
    s = ReleasedBatchSampler(labels, cams, batch_size=8, num_instances=4, num_batches=3, seed=7)
    s.set_epoch(2)
    got = list(s)
    rng = np.random.default_rng([7, 2])
    p1, p2 = s.one_pass(rng), s.one_pass(rng)
    assert got == [p1[:8], p2[:8], s.one_pass(rng)[:8]]
    assert s.epoch == 3 and list(s) != got  # the next epoch differs
    s.set_epoch(2)
    assert list(s) == got  # a function of (seed, epoch)
    assert all(labels[i] >= 0 for b in got for i in b)


def test_released_sampler_bad_cases() -> None:
    labels, cams = released_case()
    with pytest.raises(DataError, match="fewer than batch_size"):
        ReleasedBatchSampler(labels, cams, batch_size=14, num_instances=4, num_batches=1)  # a pass has 13
    with pytest.raises(DataError):
        ReleasedBatchSampler([0, 0, -1], [0, 1, 0], 2, 2, 1)  # one identity
    with pytest.raises(DataError):
        ReleasedBatchSampler([0, 1], [0], 2, 2, 1)
    one = ReleasedBatchSampler(labels, cams, batch_size=4, num_instances=1, num_batches=2)
    assert all(len(set(labels[b])) == 4 for b in one)  # K = 1: anchors only


def test_batch_sampler_choice() -> None:
    labels, cams = released_case()
    assert SAMPLERS == ("balanced", "released")
    assert isinstance(batch_sampler("balanced", labels, cams, 8, 4, 2), IdentityBatchSampler)
    assert isinstance(batch_sampler("released", labels, cams, 8, 4, 2), ReleasedBatchSampler)
    with pytest.raises(ValueError):
        batch_sampler("random", labels, cams, 8, 4, 2)
