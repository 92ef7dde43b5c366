"""The ``shopee-tpu`` argument parser: one table of commands and their options."""

from __future__ import annotations

import argparse
import re

from shopee_tpu import __version__
from shopee_tpu.accelerator import DEVICES
from shopee_tpu.cli import commands
from shopee_tpu.cli.bench_parser import add_bench_parser
from shopee_tpu.config import PRESETS
from shopee_tpu.inference.exported import FORMATS as EXPORT_FORMATS
from shopee_tpu.inference.submission import AUTO, FORMAT_CHOICES, FORMATS
from shopee_tpu.inference.tta_views import REDUCERS


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
    p.set_defaults(func=commands.cdiscount_command)


def _add_export_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="a run's model as LiteRT, ONNX or SavedModel, checked"
    )
    p.add_argument("--run", required=True, help="a training run folder")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="litert")
    p.add_argument(
        "--quantize",
        choices=("float16", "int8"),
        default=None,
        help="litert only: float16 (weights) or int8 (calibrated on training images)",
    )
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--weights", choices=("best", "last"), default="best")
    p.add_argument(
        "--calibration", default=None, help="int8: records (default: data.train)"
    )
    p.add_argument(
        "--check",
        default=None,
        help="records to compare with Keras on (default: the run's validation)",
    )
    p.add_argument(
        "--no-check", action="store_true", help="skip the comparison with Keras"
    )
    p.add_argument("--calibration-images", type=int, default=300, help="int8")
    p.add_argument("--check-images", type=int, default=1000, help="at most")
    p.set_defaults(func=commands.export_command)


def _add_tfrecords_parser(sub) -> None:
    p = sub.add_parser(
        "tfrecords",
        help="write TFRecord shards from images: a CSV of files, class folders, a "
        "pixel CSV or idx files",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--csv", help="CSV with filename,category or path,label[,group]"
    )
    source.add_argument(
        "--folders",
        metavar="DIR",
        help="one subfolder per class (or a folder of test images)",
    )
    source.add_argument(
        "--pixels-csv",
        metavar="FILE",
        help="label,pixel1..pixelN rows (Kaggle's Fashion-MNIST, Digit Recognizer)",
    )
    source.add_argument(
        "--idx",
        nargs="+",
        metavar="FILE",
        help="IMAGES [LABELS]: MNIST idx files, gzipped or not",
    )
    p.add_argument(
        "--images", default=None, help="--csv: folder the CSV's paths are relative to"
    )
    p.add_argument("--shape", default=None, help="--pixels-csv: e.g. 28x28 or 32x32x3")
    p.add_argument(
        "--class-names",
        default=None,
        help="--pixels-csv, --idx: names of class ids 0, 1, ... (comma-separated, "
        "or a file with one per line)",
    )
    p.add_argument(
        "--out", required=True, help="output folder for shards and manifest.json"
    )
    p.add_argument(
        "--test",
        action="store_true",
        default=None,
        help="unlabeled test set (keeps filenames; --idx: labels ignored); "
        "--folders, --pixels-csv: default from the layout",
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
    p.set_defaults(func=commands.tfrecords_command)


def _add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train (and resume) a run from a config")
    _add_config_args(p)
    p.add_argument(
        "--out", default=None, help="run folder (default: the config's out_dir)"
    )
    p.add_argument(
        "--time-limit",
        type=parse_duration,
        default=None,
        help="e.g. 8h45m: the epochs that fit are planned, the schedule ends with them",
    )
    p.add_argument(
        "--resume-later",
        action="store_true",
        help="with --time-limit: only stop there, and train every epoch over "
        "several sessions (rerun to resume)",
    )
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
    p.add_argument(
        "--tensorboard",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="write TensorBoard logs (default DIR: RUN/tensorboard)",
    )
    p.add_argument(
        "--resume-stopped",
        action="store_true",
        help="train on past a run that EarlyStopping (or another callback) ended",
    )
    p.set_defaults(func=commands.train_command)


def _add_predict_parser(sub) -> None:
    p = sub.add_parser(
        "predict", help="predict test records with TTA; write a submission"
    )
    p.add_argument("--run", default=None, help="a training run folder")
    p.add_argument(
        "--model", default=None, help="instead of --run: an exported .tflite or .onnx"
    )
    p.add_argument("--data", default=None, help="test TFRecords (folder, file or glob)")
    p.add_argument(
        "--images",
        nargs="+",
        default=None,
        metavar="DIR|CSV|FILE",
        help="instead of --data: image files, folders or a CSV of paths",
    )
    p.add_argument("--image-root", default=None, help="where a CSV's paths start")
    p.add_argument("--threads", type=int, default=None, help="--model: CPU threads")
    p.add_argument("--tta", default=None, help="views, e.g. identity,flip_lr")
    p.add_argument("--reduce", choices=REDUCERS, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--out", default="submission.csv")
    p.add_argument(
        "--format",
        choices=FORMAT_CHOICES,
        default=AUTO,
        help="auto: with --data, shopee when the classes are numbers, else named; "
        "with --images, path,category,probability (not a submission); "
        + "; ".join(f"{f.name}: {f.summary}" for f in FORMATS.values()),
    )
    p.add_argument(
        "--probability",
        action="store_true",
        help="named format: add the probability of each row's class",
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
    p.set_defaults(func=commands.predict_command)


def _add_stack_parser(sub) -> None:
    p = sub.add_parser(
        "stack", help="stack runs' out-of-fold probabilities into a submission"
    )
    p.add_argument("--oof", nargs="+", required=True, help="each run's oof.npz")
    p.add_argument(
        "--test", nargs="+", required=True, help="each run's test .probs.npz, in order"
    )
    p.add_argument("--out", default="submission.csv")
    p.add_argument("--format", choices=FORMAT_CHOICES, default=AUTO)
    p.add_argument("--data", default=None, help="test records (cdiscount: products)")
    p.add_argument(
        "--expected", default=None, help="test.csv whose ids must each appear once"
    )
    p.add_argument("--kind", choices=("per_class", "full"), default="per_class")
    p.set_defaults(func=commands.stack_command)


def _add_sweep_parser(sub) -> None:
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
    p.set_defaults(func=commands.sweep_command)


def _add_tune_parser(sub) -> None:
    p = sub.add_parser("tune", help="an Optuna search over config keys, resumable")
    _add_config_args(p)
    p.add_argument(
        "--space",
        action="append",
        required=True,
        metavar="KEY=A,B|LOW:HIGH[:log]",
        help="one key's values or range, e.g. --space optim.learning_rate=1e-4:1e-2:log",
    )
    p.add_argument("--trials", type=int, required=True, help="trials to have done")
    p.add_argument("--out", required=True, help="the search folder (study.db inside)")
    p.add_argument("--time-limit", type=parse_duration, default=None, help="e.g. 8h45m")
    p.add_argument("--device", choices=DEVICES, default=None)
    p.set_defaults(func=commands.tune_command)


def _add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the main job end to end on bundled real data")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a smaller, faster setting")
    p.add_argument(
        "--seed", type=int, default=None, help="seed of the data split and training"
    )
    p.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE"
    )
    p.set_defaults(func=commands.demo_command)


def _add_kernel_parser(sub) -> None:
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
    k.set_defaults(func=commands.kernel_build_command)
    k = kernel.add_parser("push", help="push a built folder with the kaggle client")
    k.add_argument("folder", help="a folder from `kernel build`")
    k.add_argument(
        "--accelerator",
        choices=("TpuV5E8", "NvidiaTeslaT4", "none"),
        default=None,
        help="TPU v5e-8, GPU T4 x2 or CPU (default: the folder's machine_shape)",
    )
    k.add_argument("--timeout", type=int, default=None, help="session limit in seconds")
    k.set_defaults(func=commands.kernel_push_command)
    k = kernel.add_parser("status", help="status of a kernel's latest session")
    k.add_argument("slug", help="owner/kernel-slug")
    k.set_defaults(func=commands.kernel_status_command)


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
    p.set_defaults(func=commands.config_command)

    # Each command's options, in the order `shopee-tpu --help` lists them.
    for add in (
        _add_tfrecords_parser,
        _add_cdiscount_parser,
        _add_train_parser,
        _add_predict_parser,
        _add_export_parser,
        _add_stack_parser,
        _add_sweep_parser,
        _add_tune_parser,
        _add_demo_parser,
        add_bench_parser,
        _add_kernel_parser,
    ):
        add(sub)

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
