"""Typed, validated configuration for every lf2 stage.

All defaults live here, in one place (fast-reid style). A recipe is a YAML file that overrides some of
them (``configs/paper_duke2market.yaml``, ``configs/demo.yaml``, ...); the command line overrides the
recipe with ``--set section.key=value``. Unknown keys are rejected with the dotted key named, and
values are checked against the dataclass field types, so a typo never silently falls back to a default.

    cfg = load_config("demo", overrides=["finetune.rounds=3", "cluster.method=kmeans"])
    cfg.finetune.rounds  # -> 3
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A bad recipe file, key or value. The message names the key or file at fault."""


# --------------------------------------------------------------------------------------------- sections
@dataclass
class DomainConfig:
    """One dataset: a format name understood by ``lf2core.data.datasets.load`` and a root path/URI."""

    name: str = "market1501"  # market1501 | dukemtmc | msmt17 | folder
    root: str = ""  # local path or s3:// URI


@dataclass
class SynthConfig:
    """Synthetic two-domain data written by ``lf2 data synth`` (used by the demo and the tests)."""

    ids: int = 200  # training identities per domain
    test_ids: int = 100  # query/gallery identities per domain
    seed: int = 0


@dataclass
class DataConfig:
    source: DomainConfig = field(default_factory=lambda: DomainConfig("dukemtmc", ""))
    target: DomainConfig = field(default_factory=lambda: DomainConfig("market1501", ""))
    synth: SynthConfig = field(default_factory=SynthConfig)
    height: int = 256
    width: int = 128
    num_workers: int = 4
    cache_dir: str = ""  # where s3:// datasets are downloaded to ("" = ~/.cache/lf2)


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # resnet50 | resnet18 | resnet18_narrow (CPU demo) ...
    weights: str = "imagenet"  # imagenet (torchvision enum, needs network) | none | a local path or s3:// URI
    last_stride: int = 1
    num_parts: int = 2  # K horizontal parts; the released code hard-wires 2
    attention_reduction: int = 4


@dataclass
class PretrainConfig:
    epochs: int = 80
    iters_per_epoch: int = 200
    batch_size: int = 64
    num_instances: int = 4
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    warmup_epochs: int = 10
    warmup_factor: float = 0.01
    milestones: list[int] = field(default_factory=lambda: [40, 70])
    gamma: float = 0.1
    label_smoothing: float = 0.1
    triplet_margin: float = 0.0  # 0 -> soft-margin triplet (softplus)
    adapt_target_bn: bool = True  # forward a target batch each iteration (no loss) as the released code
    eval_every: int = 5  # epochs; evaluation on the SOURCE test split only (0 = never)


@dataclass
class ClusterConfig:
    method: Literal["kmeans", "dbscan"] = "kmeans"
    num_clusters: int = 700  # kmeans K (paper: 700 D->M, 900 M->D)
    k1: int = 30
    k2: int = 6
    eps: float = 0.6
    min_samples: int = 4
    outliers: Literal["drop", "singleton"] = "drop"
    kmeans_batch_size: int = 300
    kmeans_max_iter: int = 100
    kmeans_n_init: int = 1
    kmeans_init_size: int = 1500


@dataclass
class FinetuneConfig:
    variant: Literal["lf2", "mt_global"] = "lf2"
    rounds: int = 80
    epochs_per_round: int = 1
    iters_per_epoch: int = 400
    batch_size: int = 64
    num_instances: int = 4
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    ema_alpha: float = 0.999
    label_smoothing: float = 0.1
    part_loss_weight: float = 0.5
    fusion_loss_weight: float = 0.0  # > 0: also train the fusion attention (not in the released code)
    random_erasing: float = 0.5


@dataclass
class EvalConfig:
    batch_size: int = 256
    flip: bool = True
    rerank: bool = False
    max_rank: int = 50


@dataclass
class TrackingConfig:
    tracking_uri: str = ""  # "" -> $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str = "lf2"
    registered_model: str = "lf2-reid"


@dataclass
class Config:
    recipe: str = "custom"
    seed: int = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # autocast on CUDA only
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"finetune.rounds": 80, ...}``: the resolved config as MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, d: dict[str, Any]) -> None:
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(f"{prefix}{k}.", v)
                else:
                    out[prefix + k] = v

        walk("", self.to_dict())
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------- validation
def _check_value(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(value, inner[0], key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_check_value(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp}")  # pragma: no cover


def _merge(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    """Merge a nested dict into dataclass ``obj`` in place, rejecting unknown keys by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}' (valid here: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, dotted + ".")
        else:
            setattr(obj, key, _check_value(value, hints[key], dotted))


def _validate(cfg: Config) -> None:
    positive = {
        "data.height": cfg.data.height,
        "data.width": cfg.data.width,
        "pretrain.batch_size": cfg.pretrain.batch_size,
        "pretrain.num_instances": cfg.pretrain.num_instances,
        "finetune.batch_size": cfg.finetune.batch_size,
        "finetune.num_instances": cfg.finetune.num_instances,
        "finetune.iters_per_epoch": cfg.finetune.iters_per_epoch,
        "cluster.k1": cfg.cluster.k1,
        "cluster.k2": cfg.cluster.k2,
        "cluster.min_samples": cfg.cluster.min_samples,
        "model.num_parts": cfg.model.num_parts,
    }
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"config key '{key}': must be > 0, got {v}")
    for sec in ("pretrain", "finetune"):
        s = getattr(cfg, sec)
        if s.batch_size % s.num_instances:
            raise ConfigError(
                f"config key '{sec}.batch_size': {s.batch_size} is not a multiple of "
                f"{sec}.num_instances={s.num_instances}"
            )
    if cfg.data.height % (cfg.model.num_parts * 16):
        raise ConfigError(
            f"config key 'data.height': {cfg.data.height} must be a multiple of 16*model.num_parts "
            f"so that the feature map splits into equal parts"
        )
    if not 0.0 <= cfg.finetune.ema_alpha < 1.0:
        raise ConfigError(f"config key 'finetune.ema_alpha': must be in [0, 1), got {cfg.finetune.ema_alpha}")
    if not 0.0 < cfg.cluster.eps < 1.0:
        raise ConfigError(f"config key 'cluster.eps': must be in (0, 1), got {cfg.cluster.eps}")
    if cfg.cluster.method == "kmeans" and cfg.cluster.num_clusters < 2:
        raise ConfigError("config key 'cluster.num_clusters': k-means needs at least 2 clusters")
    if cfg.model.last_stride not in (1, 2):
        raise ConfigError(f"config key 'model.last_stride': must be 1 or 2, got {cfg.model.last_stride}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3). The value is parsed as YAML (numbers, booleans, lists)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    if value is None:
        value = raw  # "a=null" or "a=~" is kept as a string; no key is optional
    return key.split("."), value


def recipe_path(recipe: str) -> Path:
    """A recipe name (``demo``) or a path to a YAML file."""
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    return CONFIG_DIR / f"{recipe}.yaml"


def load_config(recipe: str | None = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults <- recipe YAML (name in configs/ or a path) <- ``key=value`` overrides; validated."""
    cfg = Config()
    if recipe:
        path = recipe_path(recipe)
        if not path.is_file():
            known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
            raise ConfigError(f"recipe '{recipe}': no file {path} (known recipes: {', '.join(known)})")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe file {path}: invalid YAML ({e})") from None
        try:
            _merge(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"recipe file {path}: {e}") from None
        if "recipe" not in data:
            cfg.recipe = path.stem
    for text in overrides or []:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _merge(cfg, nested)
    _validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. a checkpoint's stored config)."""
    cfg = Config()
    _merge(cfg, data)
    _validate(cfg)
    return cfg


def config_from_yaml(text: str) -> Config:
    return config_from_dict(yaml.safe_load(text) or {})
