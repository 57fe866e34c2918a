"""The ``lf2`` command: one sub-command per stage plus data tools, the local runner and the pipeline.

Every stage sub-command takes ``--config RECIPE`` (a name in configs/ or a YAML path) and any number of
``--set key=value`` overrides, then calls the matching function in ``lf2core.stages``; the stage
sub-commands, their options and the owner of their ``--out`` come from the stage table
(``lf2core.stages.table.STAGES``). Errors caused by bad input are printed as one ``lf2: error: ...`` line
naming the file/key/URI, with exit status 2.

lf2core knows nothing above itself: commands owned by other packages (``lf2 pipeline``, in
``pipelines.cli``) are passed to ``main`` as ``Command`` objects by the console script's module
(``pipelines.cli:lf2_main``), which may import both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from .config import Config, ConfigError, SynthConfig, load_config
from .errors import Lf2Error
from .stages.table import STAGES, SYNTHETIC_DATA, Stage

log = logging.getLogger("lf2")


def one_line(e: BaseException) -> str:
    """The message of an lf2 error as one line. An error raised in a DataLoader worker comes back wrapped
    ("Caught DataError in DataLoader worker process 0. Original Traceback ..."): its last line is the
    original message."""
    text = str(e)
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith(("Error", "Exception")) else last
    return " ".join(text.split())


@dataclass(frozen=True)
class Command:
    """A sub-command contributed by a package above lf2core: ``add(subparsers)`` adds its parser and sets
    ``func(args) -> exit status``."""

    name: str
    add: Callable[[Any], None]


def _print_metrics(metrics: Any) -> None:
    if metrics is not None:
        print(json.dumps(metrics, indent=2, sort_keys=True, default=float))


# ----------------------------------------------------------------------------------------- handlers
def _claim_out(args: argparse.Namespace, owner: str) -> None:
    """Refuse an ``--out`` that holds anything but a previous output of ``owner`` (before any work starts),
    and mark such a previous output as being replaced."""
    from . import storage

    storage.set_overwrite(args.overwrite)
    if owner:
        storage.claim_output(args.out, owner)


def _run_stage(stage: Stage, args: argparse.Namespace) -> int:
    """``lf2 <stage>``: claim ``--out`` for the stage, call its function, print its metrics."""
    if stage.output is not None:
        _claim_out(args, stage.name)
    locations = [getattr(args, p.name) for p in stage.inputs]
    if stage.output is not None:
        locations.append(args.out)
    params = {p.name: getattr(args, p.name) for p in stage.params}
    _print_metrics(stage(args.cfg, *locations, **params))
    return 0


def _data_synth(args: argparse.Namespace) -> int:
    from .data.synthetic import write_domain

    _claim_out(args, SYNTHETIC_DATA)
    _print_metrics(write_domain(args.domain, args.out, ids=args.ids, test_ids=args.test_ids, seed=args.seed,
                                height=args.height, width=args.width, layout=args.layout,
                                version=args.version))
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from .data.datasets import check_main

    return check_main(args.root, args.format, open_images=not args.no_images, role=args.role)


def _promote(args: argparse.Namespace) -> int:
    from .tracking import promote_main

    return promote_main(version=args.version, alias=args.alias, min_map=args.min_map, force=args.force,
                        model_name=args.model_name, tracking_uri=args.tracking_uri)


def _optional_cfg(args: argparse.Namespace) -> Optional[Config]:
    """The config only when given (--config/--set); else None: the model's own stored settings apply."""
    return args.cfg if (args.config or args.set) else None


def _export(args: argparse.Namespace) -> int:
    from .serving.onnx_export import export_main

    _claim_out(args, "export-onnx")
    return export_main(_optional_cfg(args), args.model, args.data, args.out, fmt=args.format, opset=args.opset,
                       fixed_images=args.fixed_images)


def _search(args: argparse.Namespace) -> int:
    from .serving.search import search_main

    return search_main(args.model, args.gallery, args.query, top_k=args.top_k, split=args.split,
                       png=args.png or None, cfg=_optional_cfg(args), cache_dir=args.cache_dir,
                       batch_size=args.batch_size, json_out=args.json)


def _run_local(args: argparse.Namespace) -> int:
    from .stages.run_local import run_local

    _claim_out(args, "")
    every = args.cfg.eval.every_rounds if args.eval_every is None else args.eval_every
    res = run_local(args.cfg, args.out, data=args.data, source_model=args.source_model, eval_every=every,
                    mlflow=args.mlflow, run_name=args.run_name)
    _print_metrics(res["metrics"])
    if res.get("run_id"):
        from .tracking.compare import run_links

        for what, url in run_links(res["run_id"]).items():
            print(f"{what}: {url}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .tracking.compare import compare_main

    return compare_main(args.run_ids, experiment=args.experiment, png=args.png, tracking_uri=args.tracking_uri,
                        max_runs=args.max_runs)


# ----------------------------------------------------------------------------------------- parser
def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="write into an --out that holds other files (lf2 never deletes files it did not write; "
                        "without this flag such an --out is refused)")


def _add_cfg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default="demo", help="recipe name in configs/ or a YAML path (default: demo)")
    p.add_argument(
        "--set", "-s", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set finetune.rounds=3 (repeatable)",
    )


def _add_stage(sub: Any, stage: Stage) -> None:
    """``lf2 <stage.command>``: ``--<input>`` per input location, ``--out`` (+ ``--overwrite``), params."""
    p = sub.add_parser(stage.command, help=stage.help)
    _add_cfg(p)
    for port in stage.inputs:
        p.add_argument(f"--{port.name}", required=True, help=port.help or None)
    if stage.output is not None:
        p.add_argument("--out", required=True)
        _add_overwrite(p)
    for prm in stage.params:
        p.add_argument(prm.flag, dest=prm.name, type=prm.type, default=prm.default, help=prm.help or None)
    p.set_defaults(func=lambda args, s=stage: _run_stage(s, args))


def _add_data(sub: Any) -> None:
    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="write one synthetic domain (Market-1501 or MSMT17 layout)")
    p.add_argument("--domain", choices=["a", "b"], required=True)
    p.add_argument("--out", required=True)
    _add_overwrite(p)
    p.add_argument("--ids", type=int, default=200, help="training identities (default 200)")
    p.add_argument("--test-ids", type=int, default=100, help="query/gallery identities (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layout", choices=["market1501", "msmt17"], default="market1501",
                   help="folder layout and names (default market1501; msmt17: V1 list files, no distractors)")
    version = next(f for f in dataclasses.fields(SynthConfig) if f.name == "version")  # the config's choices
    p.add_argument("--version", choices=version.metadata["range"]["choices"], default=version.default,
                   help=f"generator version (default {version.default}, Market-shaped; 1.1: the earlier, easier pair)")
    p.set_defaults(func=_data_synth)
    p = data.add_parser("check", help="print split statistics; non-zero exit naming each bad file")
    p.add_argument("root")
    p.add_argument("--format", default=None, help="market1501 | dukemtmc | msmt17 | folder (default: detect)")
    p.add_argument("--no-images", action="store_true", help="parse names only, do not open images")
    p.add_argument("--role", choices=["source", "target"], default="target",
                   help="hold the splits to prepare-data's rules for this domain (default: target, which "
                        "needs train, query and gallery; a source needs a labelled train split)")
    p.set_defaults(func=_data_check)


def _add_promote(sub: Any) -> None:
    p = sub.add_parser("promote", help="move the champion alias to a better registered version")
    p.add_argument("--version", default=None, help="version to promote (default: the 'candidate' alias)")
    p.add_argument("--alias", default="champion")
    p.add_argument("--min-map", type=float, default=None, help="refuse below this target mAP (fraction)")
    p.add_argument("--force", action="store_true", help="promote without comparing with the champion")
    p.add_argument("--model-name", default="lf2-reid")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=_promote)


def _add_optional_cfg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None,
                   help="recipe for a stage output's sizes and flip (default: the checkpoint's own config)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE")


MODEL_HELP = ("models:/NAME/VERSION | models:/NAME@ALIAS (registered), a finetune/pretrain output or checkpoint "
              "(sizes from --config/--set, else the checkpoint's own config)")


def _add_export(sub: Any) -> None:
    p = sub.add_parser("export", help="export a model to ONNX and prove it ranks like PyTorch (parity gate)")
    _add_optional_cfg(p)
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", required=True, help="prepare-data output: its target query/gallery is the parity set")
    p.add_argument("--out", required=True, help="writes model.onnx and parity.json there")
    _add_overwrite(p)
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--fixed-images", type=int, default=32, help="size of the fixed parity image set (default 32)")
    p.set_defaults(func=_export)


def _add_search(sub: Any) -> None:
    p = sub.add_parser("search", help="top-k gallery images of query images, with distances and a rank-list PNG")
    _add_optional_cfg(p)
    p.add_argument("--model", required=True, help=MODEL_HELP + ", or an .onnx file from `lf2 export`")
    p.add_argument("--gallery", required=True, help="image folder, s3:// prefix, or with --split a prepare-data "
                                                    "output / dataset root")
    p.add_argument("--split", default=None, help="target_gallery, source_query ... (prepare-data output) or "
                                                 "gallery, query, train (dataset root)")
    p.add_argument("--query", "-q", nargs="+", required=True, help="query image file(s), local or s3://")
    p.add_argument("--top-k", "-k", type=int, default=10)
    p.add_argument("--png", default="search_ranklist.png", help="rank-list PNG (default search_ranklist.png; '' = none)")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--cache-dir", default=None, help="gallery embedding cache (default: <lf2 cache>/embeddings)")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=_search)


def _add_run_local(sub: Any) -> None:
    p = sub.add_parser("run-local", help="the whole method in one process (prepare .. evaluate)")
    _add_cfg(p)
    p.add_argument("--out", required=True)
    _add_overwrite(p)
    p.add_argument("--data", default=None, help="existing prepare-data output (default: prepare it)")
    p.add_argument("--source-model", default=None, help="existing pretrain output (default: pretrain)")
    p.add_argument("--eval-every", type=int, default=None, metavar="N",
                   help="also evaluate the teacher every N rounds (target test split; curves only, never "
                        "used to select anything; default: eval.every_rounds; 0 = only the final teacher)")
    p.add_argument("--mlflow", action="store_true",
                   help="log the run to MLflow as the pipeline does (tracking.tracking_uri, $MLFLOW_TRACKING_URI "
                        "or ./mlflow.db; experiment tracking.experiment)")
    p.add_argument("--run-name", default=None, help="MLflow run name (with --mlflow)")
    p.set_defaults(func=_run_local)


def _add_compare(sub: Any) -> None:
    p = sub.add_parser("compare", help="compare MLflow runs: config differences, final metrics, best round, "
                                       "adaptation curves side by side (PNG)")
    p.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="MLflow run ids or run names (default with "
                                                                "--experiment: its latest runs)")
    p.add_argument("--experiment", "-e", default=None, help="experiment holding the runs (names are looked up there)")
    p.add_argument("--png", default="compare_curves.png", help="curves PNG (default compare_curves.png; '' = none)")
    p.add_argument("--max-runs", type=int, default=5, help="with --experiment and no RUN_ID: this many latest runs")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=_compare)


def build_parser(commands: Sequence[Command] = ()) -> argparse.ArgumentParser:
    """The ``lf2`` parser: data tools, one sub-command per stage of the table, promote, run-local, and the
    ``commands`` of packages above lf2core."""
    parser = argparse.ArgumentParser(prog="lf2", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data(sub)
    for stage in STAGES:
        _add_stage(sub, stage)
    _add_promote(sub)
    _add_export(sub)
    _add_search(sub)
    _add_run_local(sub)
    _add_compare(sub)
    for cmd in commands:
        cmd.add(sub)
    return parser


def main(argv: Optional[list[str]] = None, commands: Sequence[Command] = ()) -> int:
    """Run ``lf2`` with ``argv`` (default: ``sys.argv[1:]``); ``commands``: see ``Command``."""
    args = build_parser(commands).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if hasattr(args, "set"):  # validate the config before importing anything heavy
            args.cfg = load_config(args.config, args.set)
            if args.cfg.data.cache_dir:
                from . import storage

                storage.set_cache_dir(args.cfg.data.cache_dir)
        return int(args.func(args) or 0)
    except (Lf2Error, ConfigError) as e:
        print(f"lf2: error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system refused: read-only, full disk, a path under a file ...
        where = f"{e.filename}: " if e.filename else ""
        print(f"lf2: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lf2: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
