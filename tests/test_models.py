"""Networks against dense re-implementations from their definitions, and checkpoint files."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
import torchvision

from lf2core.checkpoint import load_checkpoint, load_state, save_checkpoint, save_state
from lf2core.config import load_config
from lf2core.errors import CheckpointError, Lf2Error
from lf2core.models import (
    Fuse,
    LF2Model,
    MeanTeacher,
    SourceModel,
    build_backbone,
    build_target_model,
    load_mean_teacher,
    set_bn_eval,
)
from lf2core.models.lf2 import split_rows

ARCH = "resnet18_narrow"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def bn_train_ref(v: torch.Tensor, bn: torch.nn.BatchNorm1d) -> torch.Tensor:
    """BatchNorm1d in train mode from its definition (biased batch variance)."""
    mean = v.mean(0)
    var = v.var(0, unbiased=False)
    return (v - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias


def bn_eval_ref(v: torch.Tensor, bn: torch.nn.BatchNorm1d) -> torch.Tensor:
    return (v - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def pool(v: torch.Tensor) -> torch.Tensor:
    """GAP + GMP by explicit reshapes: [B,C,h,w] -> [B,C]."""
    flat = v.reshape(v.shape[0], v.shape[1], -1)
    return flat.sum(-1) / flat.shape[-1] + flat.max(-1).values


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(6, 3, 64, 32, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------- backbone
def test_backbone_shapes_and_last_stride():
    bb, c = build_backbone(ARCH)
    assert c == 256 and bb(torch.randn(2, 3, 64, 32)).shape == (2, 256, 4, 2)
    bb2, _ = build_backbone(ARCH, last_stride=2)
    assert bb2(torch.randn(2, 3, 64, 32)).shape == (2, 256, 2, 1)
    r50, c50 = build_backbone("resnet50")
    assert c50 == 2048
    assert r50.layer4[0].conv2.stride == (1, 1) and r50.layer4[0].downsample[0].stride == (1, 1)
    assert r50.layer3[0].conv2.stride == (2, 2)
    with torch.no_grad():
        assert r50(torch.randn(1, 3, 64, 32)).shape == (1, 2048, 4, 2)
    with pytest.raises(Lf2Error, match="resnet7"):
        build_backbone("resnet7")


def test_backbone_loads_torchvision_state_dict_from_path(tmp_path, caplog):
    ref = torchvision.models.resnet18(weights=None)
    state = ref.state_dict()
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    bb, _ = build_backbone("resnet18", weights=str(path))
    own = bb.state_dict()
    assert all(torch.equal(own[k], state[k]) for k in own)  # fc.* ignored, everything else loaded
    # a state with a key missing is reported, and still loads the rest
    partial = {k: v for k, v in state.items() if k != "layer1.0.conv1.weight"}
    torch.save({"state_dict": {"module." + k: v for k, v in partial.items()}}, path)
    with caplog.at_level("WARNING"):
        bb, _ = build_backbone("resnet18", weights=str(path))
    assert "missing" in caplog.text and torch.equal(bb.state_dict()["layer2.0.conv1.weight"], state["layer2.0.conv1.weight"])


def test_backbone_weight_errors_name_the_file(tmp_path, monkeypatch):
    bad = tmp_path / "junk.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="junk.pth"):
        build_backbone(ARCH, weights=str(bad))
    with pytest.raises(CheckpointError, match="nope.pth"):
        build_backbone(ARCH, weights=str(tmp_path / "nope.pth"))
    wrong = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(CheckpointError, match="do not fit"):
        build_backbone(ARCH, weights=str(wrong))
    # imagenet when the download fails: a clear Lf2Error telling what to pass instead
    import torchvision.models._api as api

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torchhome"))
    with pytest.raises(Lf2Error, match="local path or s3:// URI"):
        build_backbone("resnet18", weights="imagenet")
    with pytest.raises(Lf2Error, match="no torchvision weights"):
        build_backbone(ARCH, weights="imagenet")


# ----------------------------------------------------------------------------------------- source model
def test_source_model_matches_definition(x):
    torch.manual_seed(0)
    m = SourceModel(ARCH, num_classes=9)
    assert m.feat_bn.bias.requires_grad is False and torch.all(m.feat_bn.bias == 0)
    assert m.classifier.bias is None
    m.train()
    feat, logits = m(x)
    fmap = m.backbone(x)
    ref_feat = fmap.mean(dim=(2, 3))
    assert torch.allclose(feat, ref_feat, atol=1e-5)
    ref_logits = bn_train_ref(ref_feat, m.feat_bn) @ m.classifier.weight.t()
    assert logits.shape == (6, 9) and torch.allclose(logits, ref_logits, atol=1e-5)
    m.eval()
    with torch.no_grad():
        f = m(x)
        ref = F.normalize(bn_eval_ref(m.backbone(x).mean(dim=(2, 3)), m.feat_bn), dim=1)
    assert f.shape == (6, 256) and torch.allclose(f, ref, atol=1e-5)
    assert torch.allclose(f.norm(dim=1), torch.ones(6), atol=1e-5)


# ----------------------------------------------------------------------------------------- LF2 model
def lf2_reference(m: LF2Model, fmap: torch.Tensor, bn=bn_train_ref):
    """Global, part and attention features of LF2Model from their definitions (K=2, rows 0:h/2, h/2:h)."""
    h = fmap.shape[2]
    f0 = bn(pool(fmap), m.global_bn)
    bands = [fmap[:, :, : h // 2], fmap[:, :, h // 2 :]]
    parts, attn = [], []
    for j, band in enumerate(bands):
        flat = band.reshape(band.shape[0], band.shape[1], -1)
        avg, mx = flat.mean(-1), flat.max(-1).values
        lin = m.experts[j]
        parts.append(bn(torch.cat([avg, mx], 1) @ lin.weight.t() + lin.bias, m.part_bns[j]))
        w1 = m.attentions[j].mlp[0].weight[:, :, 0, 0]  # [C/r, C]
        w2 = m.attentions[j].mlp[2].weight[:, :, 0, 0]  # [C, C/r]
        mlp = lambda v: torch.relu(v @ w1.t()) @ w2.t()  # noqa: E731
        attn.append((avg + mx) * torch.sigmoid(mlp(mx) + mlp(avg)))
    return f0, parts, attn


def test_lf2_model_train_forward_matches_definition(x):
    torch.manual_seed(1)
    m = LF2Model(ARCH, num_classes=5).train()
    for bn in [m.global_bn, *m.part_bns]:
        assert bn.bias.requires_grad is False and torch.all(bn.bias == 0) and torch.all(bn.weight == 1)
    assert m.attentions[0].mlp[0].weight.shape == (64, 256, 1, 1)  # reduction 4
    assert m.experts[0].weight.shape == (256, 512) and torch.all(m.experts[0].bias == 0)
    out = m(x)
    assert out.feature_map.shape == (6, 256, 4, 2)
    f0, parts, attn = lf2_reference(m, out.feature_map)
    assert torch.allclose(out.global_feat, f0, atol=1e-4)
    for j in range(2):
        assert out.part_feats[j].shape == (6, 256)
        assert torch.allclose(out.part_feats[j], parts[j], atol=1e-4)
        assert torch.allclose(out.part_attention[j], attn[j], atol=1e-5)
    assert torch.allclose(out.logits, f0 @ m.classifier.weight.t(), atol=1e-4)
    assert out.logits.shape == (6, 5)


def test_lf2_model_eval_feature(x):
    m = LF2Model(ARCH, num_classes=5).eval()
    with torch.no_grad():
        feat = m(x)
        f0, parts, _ = lf2_reference(m, m.backbone(x), bn=bn_eval_ref)
    ref = F.normalize(torch.cat([f0, *parts], 1), dim=1)
    assert feat.shape == (6, 768) and torch.allclose(feat, ref, atol=1e-4)


def test_split_rows_and_generic_num_parts(x):
    fm = torch.arange(5.0).reshape(1, 1, 5, 1)
    a, b = split_rows(fm, 2)
    assert a.flatten().tolist() == [0, 1] and b.flatten().tolist() == [2, 3, 4]
    m = LF2Model(ARCH, num_classes=3, num_parts=4).train()
    out = m(x)  # map 4x2 -> four one-row bands
    assert len(out.part_feats) == 4 and len(out.part_attention) == 4
    band = out.feature_map[:, :, 2:3]
    z_ref = band.mean((2, 3)) + band.amax((2, 3))
    assert torch.allclose(out.part_attention[2], z_ref * m.attentions[2](band.mean((2, 3)), band.amax((2, 3))))
    m.eval()
    assert m(x).shape == (6, 5 * 256)


def test_reset_classifier_and_from_source():
    torch.manual_seed(2)
    src = SourceModel(ARCH, num_classes=11)
    m = LF2Model.from_source(src.state_dict(), ARCH, num_classes=7)
    sd = m.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in src.state_dict().items() if k.startswith("backbone."))
    cent = torch.randn(13, 256)
    m.reset_classifier(cent)
    assert m.num_classes == 13 and m.classifier.weight.shape == (13, 256)
    assert torch.allclose(m.classifier.weight, cent / cent.norm(dim=1, keepdim=True), atol=1e-6)
    assert m.classifier.bias is None
    with pytest.raises(ValueError):
        m.reset_classifier(torch.randn(3, 10))
    with pytest.raises(CheckpointError):
        LF2Model.from_source(SourceModel("resnet18", 3).state_dict(), ARCH, num_classes=3)


# ----------------------------------------------------------------------------------------- Fuse / teacher
def test_fuse_matches_definition():
    torch.manual_seed(3)
    fuse = Fuse(8, 2).train()
    phi = torch.randn(5, 8, 4, 2)
    z = [torch.rand(5, 8), torch.rand(5, 8)]
    out = fuse(phi, z)
    assert len(out) == 3 and all(o.shape == (5, 8) for o in out)
    assert torch.allclose(out[0], bn_train_ref(pool(phi), fuse.bns[0]), atol=1e-5)
    for j in range(2):
        ref = bn_train_ref(pool(phi * z[j].reshape(5, 8, 1, 1)), fuse.bns[j + 1])
        assert torch.allclose(out[j + 1], ref, atol=1e-5)
    assert all(bn.bias.requires_grad is False and torch.all(bn.weight == 1) for bn in fuse.bns)


def cfg_tiny(**over):
    ov = [f"{k}={v}" for k, v in over.items()]
    return load_config("demo", ["model.arch=resnet18_narrow", "cluster.num_clusters=6", *ov])


def test_fusion_uses_teacher_map_and_student_attention(x):
    src = SourceModel(ARCH, num_classes=4)
    mt = build_target_model(cfg_tiny(), {"state_dict": src.state_dict()})
    with torch.no_grad():
        for p in mt.teacher.backbone.parameters():  # make teacher and student differ
            p.add_(0.05 * torch.randn_like(p))
    mt.eval()
    with torch.no_grad():
        got = mt.fusion_features(x)
        z = mt.student.features(x).part_attention
        ref = mt.fuse(mt.teacher.backbone(x), z)
        wrong = mt.fuse(mt.student.backbone(x), z)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, ref))
    assert not torch.allclose(got[0], wrong[0], atol=1e-3)


def test_build_target_model_is_deterministic_across_calls():
    src = SourceModel(ARCH, num_classes=4).state_dict()
    a = build_target_model(cfg_tiny(), src)
    b = build_target_model(cfg_tiny(), src)
    c = build_target_model(cfg_tiny(seed=7), src)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    key = "student.attentions.0.mlp.0.weight"
    assert not torch.equal(sa[key], sc[key])
    assert all(not p.requires_grad for p in a.teacher.parameters())
    assert a.student.num_classes == 6


def test_mean_teacher_ema_against_loop_reference(x):
    torch.manual_seed(4)
    mt = MeanTeacher(LF2Model(ARCH, num_classes=3))
    # step 0: alpha_t = 0 -> teacher := student
    with torch.no_grad():
        for p in mt.student.parameters():
            p.add_(torch.randn_like(p))
    assert mt.update_teacher(0, 0.999) == 0.0
    assert all(torch.equal(t, s) for t, s in zip(mt.teacher.parameters(), mt.student.parameters()))
    mt.train()
    mt.teacher(x)  # teacher BN running stats move by its own forward
    buffers_before = {k: v.clone() for k, v in mt.teacher.named_buffers()}
    t_before = [p.clone() for p in mt.teacher.parameters()]
    with torch.no_grad():
        for p in mt.student.parameters():
            p.add_(torch.randn_like(p))
        for p in mt.student.buffers():
            if p.dtype.is_floating_point:
                p.add_(1.0)
    a = mt.update_teacher(9, 0.999)
    assert a == pytest.approx(0.9)
    for tb, t, s in zip(t_before, mt.teacher.parameters(), mt.student.parameters()):
        assert torch.allclose(t, 0.9 * tb + 0.1 * s, atol=1e-6)
    assert all(torch.equal(v, buffers_before[k]) for k, v in mt.teacher.named_buffers())
    assert mt.update_teacher(10**6, 0.999) == pytest.approx(0.999)


def test_test_features_are_flip_averaged_teacher_features(x):
    mt = MeanTeacher(LF2Model(ARCH, num_classes=3)).train()
    got = mt.test_features(x)
    assert mt.teacher.training  # mode restored
    mt.teacher.eval()
    with torch.no_grad():
        ref = F.normalize(mt.teacher(x) + mt.teacher(torch.flip(x, dims=[3])), dim=1)
    assert torch.allclose(got, ref, atol=1e-5)


def test_set_bn_eval():
    m = LF2Model(ARCH, 3).train()
    set_bn_eval(m)
    assert m.training and not m.global_bn.training and not m.backbone.bn1.training


# ----------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_roundtrip_and_errors(tmp_path):
    cfg = cfg_tiny()
    m = SourceModel(ARCH, num_classes=4)
    path = tmp_path / "out" / "model.pt"
    save_checkpoint(str(path), m, "source", cfg, extra={"epoch": 3})
    ck = load_checkpoint(str(path))
    assert ck["format"] == "lf2-checkpoint/1" and ck["kind"] == "source" and ck["arch"] == ARCH
    assert ck["num_classes"] == 4 and ck["epoch"] == 3 and ck["config"]["model"]["arch"] == ARCH
    assert all(torch.equal(v, ck["state_dict"][k]) for k, v in m.state_dict().items())
    with pytest.raises(CheckpointError, match="expected 'lf2'"):
        load_checkpoint(str(path), kind="lf2")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(str(bad))
    with pytest.raises(CheckpointError, match="missing.pt"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": m.state_dict()}, plain)
    with pytest.raises(CheckpointError, match="plain.pt.*not an lf2-checkpoint"):
        load_checkpoint(str(plain))


def test_mean_teacher_checkpoint_roundtrip(tmp_path, x):
    mt = build_target_model(cfg_tiny(), SourceModel(ARCH, 4).state_dict())
    mt.reset_classifier(torch.randn(5, 256))
    mt.update_teacher(3)
    cfg = cfg_tiny()
    s_state = {**{f"student.{k}": v for k, v in mt.student.state_dict().items()},
               **{f"fuse.{k}": v for k, v in mt.fuse.state_dict().items()}}
    save_checkpoint(str(tmp_path / "student.pt"), s_state, "lf2", cfg)
    save_checkpoint(str(tmp_path / "teacher.pt"), mt.teacher, "lf2", cfg)
    s = load_checkpoint(str(tmp_path / "student.pt"))
    t = load_checkpoint(str(tmp_path / "teacher.pt"))
    assert s["num_classes"] == 5 and t["num_classes"] == 5
    back = load_mean_teacher(s["state_dict"], t["state_dict"], ARCH)
    back.eval(), mt.eval()
    with torch.no_grad():
        assert all(torch.allclose(a, b) for a, b in zip(back.fusion_features(x), mt.fusion_features(x)))


def test_training_state_roundtrip_restores_rng(tmp_path):
    import random

    import numpy as np

    m = SourceModel(ARCH, 3)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5**e)
    feat, logits = m.train()(torch.randn(4, 3, 64, 32))
    logits.sum().backward()
    opt.step()
    sched.step()
    save_state(str(tmp_path / "state.pt"), m, opt, sched, epoch=2, extra={"history": [1.0]})
    expect = (torch.rand(3), np.random.rand(3), random.random())
    m2 = SourceModel(ARCH, 3)
    opt2 = torch.optim.Adam([p for p in m2.parameters() if p.requires_grad], lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda e: 0.5**e)
    info = load_state(str(tmp_path / "state.pt"), m2, opt2, sched2)
    assert info == {"epoch": 2, "extra": {"history": [1.0]}}
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert sched2.last_epoch == 1 and opt2.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expect[0]) and np.array_equal(got[1], expect[1]) and got[2] == expect[2]
    with pytest.raises(CheckpointError, match="does not fit"):
        load_state(str(tmp_path / "state.pt"), SourceModel(ARCH, 5))
