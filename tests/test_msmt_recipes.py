"""The MSMT17 recipes: their documented values, and a dry run of each on synthetic data laid out as the real
datasets (Market-1501 and MSMT17 V1 folders, lists and file names), through prepare -> evaluate."""

from __future__ import annotations

import json
import math

import pytest

from lf2core.cli import main
from lf2core.config import load_config
from lf2core.data import datasets
from lf2core.data.synthetic import write_domain
from lf2core.stages.run_local import run_local

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

#: the paper recipe shrunk to seconds: tiny network and images, two steps everywhere, K fitting 10 ids
DRY_RUN = [
    "model.arch=resnet18_narrow", "model.weights=none", "data.height=32", "data.width=16", "data.num_workers=0",
    "pretrain.epochs=2", "pretrain.iters_per_epoch=2", "pretrain.batch_size=8", "pretrain.num_instances=2",
    "pretrain.warmup_epochs=1", "pretrain.milestones=[1]", "pretrain.eval_every=1", "pretrain.bn_group=4",
    "finetune.rounds=1", "finetune.iters_per_epoch=2", "finetune.batch_size=8", "finetune.num_instances=2",
    "finetune.bn_group=4", "cluster.num_clusters=6", "cluster.kmeans_init_size=20", "cluster.kmeans_batch_size=20",
    "eval.batch_size=32", "device=cpu",
]


@pytest.mark.parametrize("recipe,source,target,k", [
    ("paper_market2msmt", "market1501", "msmt17", 1500),
    ("paper_msmt2market", "msmt17", "market1501", 700),
])
def test_recipe_values(recipe, source, target, k):
    cfg = load_config(recipe)
    paper = load_config("paper_duke2market")
    assert (cfg.data.source.name, cfg.data.target.name, cfg.cluster.num_clusters) == (source, target, k)
    # everything but the datasets, K and the recipe name is the released recipe
    a, b = cfg.to_dict(), paper.to_dict()
    for d in (a, b):
        d.pop("recipe")
        d["data"].pop("source"), d["data"].pop("target"), d["cluster"].pop("num_clusters")
    assert a == b


def test_synthetic_msmt_layout_parses_like_msmt17(tmp_path):
    stats = write_domain("b", tmp_path / "msmt", ids=20, test_ids=6, seed=2, height=32, width=16, layout="msmt17")
    assert datasets.detect_format(tmp_path / "msmt") == "msmt17"
    s = datasets.load("msmt17", tmp_path / "msmt")
    assert len(s.train) == stats["train"]["images"] and len({x.pid for x in s.train}) == 20
    assert len(s.query) == stats["query"]["images"] and len(s.gallery) == stats["gallery"]["images"]
    assert stats["gallery"]["distractors"] == stats["gallery"]["junk"] == 0
    assert {x.pid for x in s.train} == set(range(20)) and {x.pid for x in s.query} == set(range(6))
    assert (tmp_path / "msmt" / "list_val.txt").read_text().count("\n") > 0  # every 10th id: list_val
    # same identities and cameras as the Market-1501 layout of the same generation (less its distractors)
    m = write_domain("b", tmp_path / "market", ids=20, test_ids=6, seed=2, height=32, width=16)
    assert m["train"] == stats["train"] and m["query"] == stats["query"]
    assert m["gallery"]["images"] - m["gallery"]["distractors"] - m["gallery"]["junk"] == stats["gallery"]["images"]


def test_cli_synth_msmt_then_check(tmp_path, capsys):
    assert main(["data", "synth", "--domain", "a", "--out", str(tmp_path / "d"), "--ids", "8", "--test-ids", "3",
                 "--height", "32", "--width", "16", "--layout", "msmt17"]) == 0
    capsys.readouterr()
    assert main(["data", "check", str(tmp_path / "d"), "--format", "msmt17"]) == 0
    assert "msmt17" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["paper_market2msmt", "paper_msmt2market"])
def test_recipe_dry_run_on_synthetic_data_in_the_real_layouts(tmp_path, recipe):
    """The recipe as shipped (released switches: sampler, BN groups, best-source checkpoint, k-means centres,
    erasing) with only sizes shrunk, on synthetic data in each dataset's own layout: every stage runs."""
    cfg0 = load_config(recipe)
    roots = {}
    for side, domain in (("source", "a"), ("target", "b")):
        name = getattr(cfg0.data, side).name
        roots[side] = tmp_path / side
        write_domain(domain, roots[side], ids=10, test_ids=4, seed=3, height=32, width=16,
                     layout="msmt17" if name == "msmt17" else "market1501")
    cfg = load_config(recipe, [*DRY_RUN, f"data.source.root={roots['source']}", f"data.target.root={roots['target']}"])
    assert cfg.finetune.sampler == "released" and cfg.cluster.classifier_init == "centres"
    result = run_local(cfg, str(tmp_path / "run"))
    m = result["metrics"]
    assert 0.0 <= m["mAP"] <= 1.0 and not math.isnan(m["mAP"])
    manifest = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    assert json.dumps(manifest).count("msmt17") >= 1
