"""Config: recipes load, overrides apply with type checks, unknown keys are rejected by name."""

import subprocess
import sys

import pytest
import yaml

from lf2core.config import CONFIG_DIR, ConfigError, config_from_dict, config_from_yaml, load_config


@pytest.mark.parametrize("recipe", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_shipped_recipe_loads_and_round_trips(recipe):
    cfg = load_config(recipe)
    assert cfg.recipe == recipe
    again = config_from_yaml(cfg.to_yaml())
    assert again == cfg


def test_paper_recipes_match_the_released_code():
    d2m = load_config("paper_duke2market")
    m2d = load_config("paper_market2duke")
    assert (d2m.data.source.name, d2m.data.target.name) == ("dukemtmc", "market1501")
    assert (m2d.data.source.name, m2d.data.target.name) == ("market1501", "dukemtmc")
    assert d2m.cluster.num_clusters == 700 and m2d.cluster.num_clusters == 900
    for cfg in (d2m, m2d):
        assert cfg.model.arch == "resnet50" and cfg.model.last_stride == 1
        assert (cfg.pretrain.lr, cfg.pretrain.weight_decay) == (3.5e-4, 5e-4)
        assert cfg.pretrain.milestones == [40, 70] and cfg.pretrain.epochs == 80
        assert (cfg.finetune.rounds, cfg.finetune.iters_per_epoch) == (80, 400)
        assert cfg.finetune.ema_alpha == 0.999 and cfg.finetune.part_loss_weight == 0.5
        assert cfg.finetune.fusion_loss_weight == 0.0  # the released behaviour
        assert (cfg.data.height, cfg.data.width) == (256, 128)


def test_overrides_are_typed():
    cfg = load_config("demo", ["finetune.rounds=3", "cluster.method=dbscan", "cluster.eps=0.5",
                               "pretrain.milestones=[2, 3]", "eval.rerank=true", "tracking.experiment=x y"])
    assert cfg.finetune.rounds == 3 and cfg.cluster.method == "dbscan"
    assert cfg.cluster.eps == 0.5 and cfg.pretrain.milestones == [2, 3]
    assert cfg.eval.rerank is True and cfg.tracking.experiment == "x y"
    # an int is accepted where a float is expected, and stored as float
    assert isinstance(load_config("demo", ["finetune.lr=1"]).finetune.lr, float)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("finetune.roundz=3", "unknown config key 'finetune.roundz'"),
        ("nosuch.key=1", "unknown config key 'nosuch'"),
        ("finetune.rounds=three", "config key 'finetune.rounds': expected an integer"),
        ("finetune.rounds=2.5", "config key 'finetune.rounds': expected an integer"),
        ("cluster.method=spectral", "config key 'cluster.method'"),
        ("eval.rerank=maybe", "config key 'eval.rerank': expected true/false"),
        ("data.source.name=cuhk03", "config key 'data.source.name'"),
        ("finetune.batch_size=30", "finetune.batch_size"),
        ("data.height=70", "config key 'data.height'"),
        ("finetune.ema_alpha=1.0", "config key 'finetune.ema_alpha'"),
        ("noequalsign", "expected key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        load_config("demo", [override])
    assert fragment in str(info.value)


def test_recipe_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"finetune": {"rounds": 2, "typo": 1}}))
    with pytest.raises(ConfigError) as info:
        load_config(str(bad))
    assert str(bad) in str(info.value) and "finetune.typo" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config("no_such_recipe")
    assert "no_such_recipe" in str(info.value) and "demo" in str(info.value)


def test_flat_params_cover_every_leaf():
    cfg = load_config("demo")
    flat = cfg.flat()
    assert flat["finetune.rounds"] == cfg.finetune.rounds
    assert flat["data.source.name"] == "synthetic"
    # rebuilding from the nested dict gives the same config
    assert config_from_dict(cfg.to_dict()) == cfg


def test_cli_reports_config_errors_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lf2core.cli", "prepare", "--out", str(tmp_path / "o"), "--set", "finetune.roundz=1"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == ["lf2: error: unknown config key 'finetune.roundz' (valid here: batch_size, bn_group, "
                     "camera_proxy_intra_weight, camera_proxy_momentum, camera_proxy_negatives, "
                     "camera_proxy_temperature, camera_proxy_weight, ema_alpha, "
                     "epochs_per_round, erasing, fusion_loss_weight, iters_per_epoch, label_smoothing, lr, "
                     "num_instances, part_loss_weight, random_erasing, rounds, sampler, variant, weight_decay)"]
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ value ranges
def _out_of_range_values(rng: dict) -> list:
    """Values just outside a declared range (hand-derived from its bounds)."""
    if rng["choices"]:
        return ["not-a-choice" if isinstance(rng["choices"][0], str) else max(rng["choices"]) + 1]
    if rng["pattern"]:
        return ["  "]
    out = []
    for bound, step in (("ge", -1), ("gt", 0), ("le", +1), ("lt", 0)):
        if rng[bound] is not None:
            out.append(rng[bound] + step if isinstance(rng[bound], int) and step else rng[bound] + step)
    return out


def _ranged_keys() -> list[tuple[str, dict]]:
    import dataclasses

    from lf2core.config import Config

    keys = []

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, f"{prefix}{f.name}.")
            elif "range" in f.metadata:
                keys.append((prefix + f.name, f.metadata["range"]))

    walk(Config(), "")
    return keys


def test_every_ranged_key_rejects_values_outside_its_range_by_name():
    keys = _ranged_keys()
    assert len(keys) >= 50  # every numeric/choice key of the recipes is declared with its range
    tried = 0
    for key, rng in keys:
        for bad in _out_of_range_values(rng):
            value = f"[{bad}]" if key == "pretrain.milestones" else repr(bad) if isinstance(bad, str) else bad
            with pytest.raises(ConfigError, match=rf"config key '{key}': "):
                load_config("demo", [f"{key}={value}"])
            tried += 1
    assert tried >= len(keys)


@pytest.mark.parametrize("override, message", [
    ("pretrain.lr=-0.1", "'pretrain.lr': -0.1 is out of range, valid: > 0 and <= 10"),
    ("pretrain.epochs=-3", "'pretrain.epochs': -3 is out of range, valid: >= 1"),
    ("finetune.rounds=-1", "'finetune.rounds': -1 is out of range, valid: >= 1"),
    ("finetune.rounds=0", "'finetune.rounds': 0 is out of range"),
    ("device=gpu0", "'device': 'gpu0' must match the regular expression"),
    ("device=cuda:x", "'device': 'cuda:x' must match"),
    ("finetune.batch_size=0", "'finetune.batch_size': 0 is out of range"),
    ("finetune.batch_size=4", "'finetune.batch_size': 4 holds fewer than 2 identities"),
    ("pretrain.milestones=[5, 3]", "'pretrain.milestones': [5, 3] must be strictly increasing"),
    ("pretrain.milestones=[0]", "'pretrain.milestones': [0] is out of range"),
    ("pretrain.warmup_epochs=20", "'pretrain.warmup_epochs': 20 is more than pretrain.epochs=12"),
    ("model.arch=resnet101", "'model.arch': 'resnet101' is not one of resnet50 | resnet18 | resnet18_narrow"),
    ("finetune.random_erasing=1.5", "'finetune.random_erasing': 1.5 is out of range, valid: >= 0 and <= 1"),
    ("tracking.registered_model=a/b", "'tracking.registered_model': 'a/b' must match"),
])
def test_invalid_values_named(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    assert message in str(e.value)


def test_valid_edge_values_accepted():
    cfg = load_config("demo", ["device=cuda:1", "finetune.ema_alpha=0", "pretrain.warmup_epochs=0",
                               "finetune.random_erasing=1.0", "cluster.k2=1", "finetune.rounds=1"])
    assert cfg.device == "cuda:1" and cfg.finetune.ema_alpha == 0.0 and cfg.finetune.rounds == 1


def test_config_archs_match_the_backbones():
    from lf2core.config import MODEL_ARCHS
    from lf2core.models.backbone import ARCHS

    assert MODEL_ARCHS == ARCHS


def test_cli_bad_value_is_one_line_nonzero(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lf2core.cli", "pretrain", "--data", str(tmp_path), "--out",
                        str(tmp_path / "o"), "--set", "pretrain.epochs=-3"], capture_output=True, text=True)
    assert r.returncode == 2 and not (tmp_path / "o").exists()
    assert r.stderr.strip().splitlines() == [
        "lf2: error: config key 'pretrain.epochs': -3 is out of range, valid: >= 1"]


def test_docs_config_lists_every_key_with_its_range():
    from pathlib import Path

    from lf2core.config import describe_keys, keys_markdown

    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    rows = keys_markdown().splitlines()
    assert len(rows) == len(describe_keys()) + 2
    for row in rows:
        assert row in doc, f"docs/config.md lacks or misstates: {row}"
