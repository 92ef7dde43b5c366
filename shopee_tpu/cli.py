"""The ``shopee-tpu`` command line: a thin layer over the library functions."""

from __future__ import annotations

import argparse
import json
import re
import sys

from shopee_tpu import __version__
from shopee_tpu.accelerator import _DEVICES as DEVICES
from shopee_tpu.config import PRESETS, ConfigError, RunConfig
from shopee_tpu.console import error_line, one_line_warnings, show_native_logs
from shopee_tpu.inference.views import REDUCERS


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"named preset: {', '.join(sorted(PRESETS))}")
    p.add_argument(
        "--config", metavar="FILE", help="JSON or YAML config (or differences)"
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set data.train=recs/ --set epochs=3",
    )


def _config(args) -> RunConfig:
    return RunConfig.resolve(args.preset, args.config, args.sets)


def parse_duration(text: str) -> float:
    """Parses ``8h45m``, ``90m``, ``30s``, ``1h`` or plain seconds into seconds."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(
            f"bad duration {text!r}; use e.g. 8h45m, 90m, 30s"
        )
    scale = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * scale[u] for n, u in parts)


# ---------------------------------------------------------------------------
# Commands. Each one parses nothing itself: it hands arguments to a library call.


def _cmd_config(args) -> int:
    print(json.dumps(_config(args).to_dict(), indent=2))
    return 0


def _cmd_tfrecords(args) -> int:
    from shopee_tpu.data.records import write_records_from_csv

    manifest = write_records_from_csv(
        args.csv,
        args.images,
        args.out,
        test=args.test,
        shards=args.shards,
        image_size=args.image_size,
        resize=args.resize,
        quality=args.quality,
        workers=args.workers,
        label_map=args.label_map,
        overwrite=args.overwrite,
        seed=args.seed,
    )
    print(
        f"wrote {manifest['total']} records in {len(manifest['shards'])} shards to "
        f"{args.out} ({len(manifest['skipped'])} skipped)"
    )
    return 0


def _cmd_cdiscount(args) -> int:
    from shopee_tpu.data.cdiscount import prepare_cdiscount, prepare_cdiscount_test

    common = dict(
        shards=args.shards,
        workers=args.workers,
        image_size=args.image_size,
        resize=args.resize,
        quality=args.quality,
        overwrite=args.overwrite,
    )
    if args.action == "prepare":
        prepare_cdiscount(
            args.bson,
            args.out,
            category_names=args.category_names,
            valid_fraction=args.valid_fraction,
            seed=args.seed,
            dedup=args.dedup,
            drop_conflicts=args.drop_conflicts,
            **common,
        )
    else:
        prepare_cdiscount_test(args.bson, args.out, **common)
    return 0


def _add_cdiscount_parser(sub) -> None:
    p = sub.add_parser(
        "cdiscount", help="convert Cdiscount's train.bson / test.bson to records"
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = actions.add_parser(
        "prepare",
        help="train.bson -> training records (OUT), validation records "
        "(OUT/valid), MD5 dictionary, class map",
    )
    train.add_argument("bson", metavar="TRAIN_BSON")
    train.add_argument(
        "--category-names", default=None, help="category_names.csv (fixes class ids)"
    )
    train.add_argument(
        "--valid-fraction", type=float, default=0.05, help="share of products"
    )
    train.add_argument(
        "--seed", type=int, default=12648430, help="split seed (DATASET_B: 1)"
    )
    train.add_argument(
        "--dedup", action="store_true", help="write each distinct image once (MD5)"
    )
    train.add_argument(
        "--drop-conflicts",
        action="store_true",
        help="drop training images whose MD5 carries several categories",
    )
    test = actions.add_parser(
        "prepare-test", help="test.bson -> test records and products.csv"
    )
    test.add_argument("bson", metavar="TEST_BSON")
    for q in (train, test):
        q.add_argument("--out", required=True, help="output folder")
        q.add_argument(
            "--shards", type=int, default=None, help="default: ~20k images each"
        )
        q.add_argument("--workers", type=int, default=None, help="default: cores")
        q.add_argument("--image-size", type=int, default=None, help="resize on write")
        q.add_argument("--resize", choices=("longest", "square"), default="square")
        q.add_argument("--quality", type=int, default=95)
        q.add_argument("--overwrite", action="store_true", help="replace other records")
    p.set_defaults(func=_cmd_cdiscount)


def _cmd_train(args) -> int:
    from shopee_tpu.training import train

    cfg = _config(args)
    result = train(
        cfg,
        out_dir=args.out,
        time_limit=args.time_limit,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
        folds=args.folds,
        fold=args.fold,
    )
    print(json.dumps(result.metrics, indent=2))
    return 0


def _cmd_predict(args) -> int:
    from shopee_tpu.inference.run import predict_run

    predict_run(
        args.run,
        args.data,
        out=args.out,
        tta=tuple(v for v in args.tta.split(",") if v) if args.tta else None,
        reduce=args.reduce,
        batch_size=args.batch_size,
        format=args.format,
        md5_dict=None if args.md5_dict == "none" else args.md5_dict,
        expected=args.expected,
        weights=args.weights,
        device=args.device,
    )
    return 0


def _cmd_stack(args) -> int:
    from shopee_tpu.experiments.stack import stack_runs

    stack_runs(
        args.oof,
        args.test,
        args.out,
        format=args.format,
        data=args.data,
        expected=args.expected,
        kind=args.kind,
    )
    return 0


def _cmd_sweep(args) -> int:
    from shopee_tpu.experiments.sweep import run_sweep

    run_sweep(
        _config(args),
        args.grid,
        args.out,
        folds=args.folds,
        time_limit=args.time_limit,
        device=args.device,
    )
    return 0


def _cmd_demo(args) -> int:
    from shopee_tpu.demo import run_demo

    metrics = run_demo(args.out, quick=args.quick, sets=args.sets, seed=args.seed)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_bench(args) -> int:
    from shopee_tpu.bench import run_bench

    result = run_bench(args.what, args)
    print(json.dumps(result, indent=2 if not args.json else None))
    return 0


def _cmd_kernel_build(args) -> int:
    from shopee_tpu.kernels.build import build_kernel

    built = build_kernel(
        args.notebook, args.out, sets=args.sets, template=args.template
    )
    meta, pkg = built["metadata"], built["package"]
    print(
        f"built {built['folder']}: {meta['code_file']} carries shopee_tpu "
        f"{pkg['version']} ({pkg['files']} files, {pkg['bytes'] // 1024} KB zipped, "
        f"sha256 {pkg['sha256'][:12]}); kernel {meta.get('id')} "
        f"({meta['machine_shape'] or 'CPU'}, internet "
        f"{'on' if meta['enable_internet'] else 'off'}, metadata from "
        f"{built['template']})"
    )
    return 0


def _cmd_kernel_push(args) -> int:
    from shopee_tpu.kernels.client import push_kernel

    result = push_kernel(
        args.folder, accelerator=args.accelerator, timeout=args.timeout
    )
    for kind, items in result.invalid.items():
        print(f"warning: Kaggle did not accept these {kind}: {', '.join(items)}")
    print(f"pushed {result.slug} version {result.version}: {result.url}")
    return 0


def _cmd_kernel_status(args) -> int:
    from shopee_tpu.kernels.client import kernel_status

    status = kernel_status(args.slug)
    print(f"{status.slug}: {status.status}")
    if status.failure_message:
        print(f"failure message: {status.failure_message}")
    return 1 if status.failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shopee-tpu",
        description="Product-image classification for Kaggle kernels on TPU, GPU or CPU.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("config", help="print the resolved run config as JSON")
    _add_config_args(p)
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("tfrecords", help="write TFRecord shards from a CSV and images")
    p.add_argument(
        "--csv", required=True, help="CSV with filename,category or path,label[,group]"
    )
    p.add_argument(
        "--images", required=True, help="folder the CSV's paths are relative to"
    )
    p.add_argument(
        "--out", required=True, help="output folder for shards and manifest.json"
    )
    p.add_argument(
        "--test", action="store_true", help="unlabeled test set (keeps filenames)"
    )
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--image-size", type=int, default=None, help="resize on write")
    p.add_argument("--resize", choices=("longest", "square"), default="square")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality on re-encode")
    p.add_argument(
        "--workers", type=int, default=None, help="processes (default: cores)"
    )
    p.add_argument(
        "--label-map", default=None, help="manifest.json or JSON label map to reuse"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a different dataset"
    )
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(func=_cmd_tfrecords)

    _add_cdiscount_parser(sub)

    p = sub.add_parser("train", help="train (and resume) a run from a config")
    _add_config_args(p)
    p.add_argument(
        "--out", default=None, help="run folder (default: the config's out_dir)"
    )
    p.add_argument("--time-limit", type=parse_duration, default=None, help="e.g. 8h45m")
    p.add_argument(
        "--checkpoint-every",
        type=parse_duration,
        default=60.0,
        help="training time between checkpoints (each fit's end always commits; "
        "0: every epoch)",
    )
    p.add_argument("--device", choices=DEVICES, default=None)
    p.add_argument(
        "--folds", type=int, default=None, help="k-fold: one run per fold + oof.npz"
    )
    p.add_argument(
        "--fold", type=int, default=None, help="with --folds: train this fold only"
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "predict", help="predict test records with TTA; write a submission"
    )
    p.add_argument("--run", required=True, help="a training run folder")
    p.add_argument(
        "--data", required=True, help="test TFRecords (folder, file or glob)"
    )
    p.add_argument("--tta", default=None, help="views, e.g. identity,flip_lr")
    p.add_argument("--reduce", choices=REDUCERS, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--out", default="submission.csv")
    p.add_argument(
        "--format",
        choices=("shopee", "cdiscount"),
        default="shopee",
        help="shopee: filename,category; cdiscount: _id,category_id per product",
    )
    p.add_argument(
        "--md5-dict",
        default="auto",
        help="MD5 duplicate dictionary (.npz) to apply; default: the one the "
        "training records declare (cdiscount prepare); none: no overrides",
    )
    p.add_argument(
        "--expected",
        default=None,
        help="test.csv / sample_submission.csv whose ids must each appear once",
    )
    p.add_argument("--weights", choices=("best", "last"), default="best")
    p.add_argument("--device", choices=DEVICES, default=None)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "stack", help="stack runs' out-of-fold probabilities into a submission"
    )
    p.add_argument("--oof", nargs="+", required=True, help="each run's oof.npz")
    p.add_argument(
        "--test", nargs="+", required=True, help="each run's test .probs.npz, in order"
    )
    p.add_argument("--out", default="submission.csv")
    p.add_argument("--format", choices=("shopee", "cdiscount"), default="shopee")
    p.add_argument("--data", default=None, help="test records (cdiscount: products)")
    p.add_argument(
        "--expected", default=None, help="test.csv whose ids must each appear once"
    )
    p.add_argument("--kind", choices=("per_class", "full"), default="per_class")
    p.set_defaults(func=_cmd_stack)

    p = sub.add_parser("sweep", help="one run per grid point; a results table and plot")
    _add_config_args(p)
    p.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="KEY=V1,V2",
        help="values of one config key, e.g. --grid model.dropout=0,0.3",
    )
    p.add_argument("--folds", type=int, default=None, help="k-fold runs per point")
    p.add_argument("--out", required=True, help="the sweep folder")
    p.add_argument("--time-limit", type=parse_duration, default=None, help="e.g. 8h45m")
    p.add_argument("--device", choices=DEVICES, default=None)
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("demo", help="the main job end to end on bundled real data")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a smaller, faster setting")
    p.add_argument(
        "--seed", type=int, default=None, help="seed of the data split and training"
    )
    p.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE"
    )
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="benchmarks that print JSON")
    p.add_argument(
        "what",
        choices=("input", "train", "predict", "accuracy", "ablation", "cdiscount"),
    )
    p.add_argument("--json", action="store_true", help="compact JSON on one line")
    p.add_argument("--images", default=None, help="folder of images (bench input)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 5)")
    p.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="seconds per contender per round (default 10)",
    )
    p.add_argument(
        "--quick", action="store_true", help="a tiny setting that runs in seconds"
    )
    # bench accuracy / ablation: held-out accuracy on bundled real photographs.
    p.add_argument("--seed", type=int, default=None, help="task and training seed")
    p.add_argument("--budget", type=float, default=None, help="wall-time cap (s)")
    p.add_argument("--out", default=None, help="work folder (default: a temp dir)")
    p.add_argument(
        "--products", type=int, default=None, help="bench cdiscount: products (1x)"
    )
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("kernel", help="build, push and check Kaggle kernels")
    kernel = p.add_subparsers(dest="kernel_command", metavar="ACTION", required=True)
    k = kernel.add_parser(
        "build",
        help="a push-ready folder: the notebook carrying the package + metadata",
    )
    k.add_argument("notebook", help="the .ipynb to build")
    k.add_argument("--out", required=True, help="output folder")
    k.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="metadata override, e.g. --set id=me/shopee-tpu-baseline "
        "--set machine_shape=TpuV5E8 --set dataset_sources=me/weights",
    )
    k.add_argument(
        "--template",
        default=None,
        help="metadata template (default: kernel-metadata.json beside the notebook "
        "or one folder up, else the built-in one)",
    )
    k.set_defaults(func=_cmd_kernel_build)
    k = kernel.add_parser("push", help="push a built folder with the kaggle client")
    k.add_argument("folder", help="a folder from `kernel build`")
    k.add_argument(
        "--accelerator",
        choices=("TpuV5E8", "NvidiaTeslaT4", "none"),
        default=None,
        help="TPU v5e-8, GPU T4 x2 or CPU (default: the folder's machine_shape)",
    )
    k.add_argument("--timeout", type=int, default=None, help="session limit in seconds")
    k.set_defaults(func=_cmd_kernel_push)
    k = kernel.add_parser("status", help="status of a kernel's latest session")
    k.add_argument("slug", help="owner/kernel-slug")
    k.set_defaults(func=_cmd_kernel_status)

    # --verbose is accepted before or after the command name.
    for p in (parser, *sub.choices.values()):
        p.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=False if p is parser else argparse.SUPPRESS,
            help="show TensorFlow's own log lines and full tracebacks",
        )
    return parser


# Errors a user causes (a wrong path, value or device, no internet for weights, a
# missing extra) end in one line; anything else is a bug and keeps its traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from shopee_tpu.accelerator import AcceleratorNotFound

    errors = [OSError, ValueError, ImportError, AcceleratorNotFound]
    weights = sys.modules.get("shopee_tpu.models.weights")  # raised only once loaded
    if weights is not None:
        errors.append(weights.WeightsUnavailableError)
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        show_native_logs()
    else:
        one_line_warnings(f"shopee-tpu {args.command}")
    try:
        return args.func(args)
    except ConfigError as e:
        parser.exit(2, f"shopee-tpu: config error: {e}\n")
    except KeyboardInterrupt:
        print(f"shopee-tpu {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.verbose or not isinstance(e, _user_errors()):
            raise
        print(f"shopee-tpu {args.command}: error: {error_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
