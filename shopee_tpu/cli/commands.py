"""The ``shopee-tpu`` commands. Each one parses nothing itself: it hands the parsed
arguments to a library call and prints what it returns."""

from __future__ import annotations

import functools
import importlib.util
import json
import os

from shopee_tpu.bench import run_bench
from shopee_tpu.cdiscount.prepare import prepare_cdiscount, prepare_cdiscount_test
from shopee_tpu.config import RunConfig
from shopee_tpu.data.manifests import summary_lines
from shopee_tpu.data.write.arrays import read_class_names, write_idx_records
from shopee_tpu.data.write.folders import write_records_from_folders
from shopee_tpu.data.write.pixels_csv import write_pixels_csv
from shopee_tpu.data.write.records import write_records_from_csv
from shopee_tpu.demo import run_demo
from shopee_tpu.deploy.writer import export
from shopee_tpu.experiments.kfold import train_folds
from shopee_tpu.experiments.search import tune
from shopee_tpu.experiments.stack import stack_runs
from shopee_tpu.experiments.sweep import run_sweep
from shopee_tpu.inference.files import predict_files
from shopee_tpu.inference.run import predict_run
from shopee_tpu.kernels.build import build_kernel
from shopee_tpu.kernels.client import kernel_status, push_kernel
from shopee_tpu.training import train


def _tensorboard(log_dir: str):
    import keras  # after connect() has chosen the backend

    return keras.callbacks.TensorBoard(log_dir)


def _check_tensorboard() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise ImportError(
            "--tensorboard needs the tensorboard package (pip install tensorboard; "
            "Kaggle's and Colab's images have it)"
        )


def config_from_args(args) -> RunConfig:
    """``--preset``, then ``--config``, then each ``--set``."""
    return RunConfig.resolve(args.preset, args.config, args.sets)


def config_command(args) -> int:
    print(json.dumps(config_from_args(args).to_dict(), indent=2))
    return 0


def tfrecords_command(args) -> int:
    common = dict(
        shards=args.shards,
        image_size=args.image_size,
        resize=args.resize,
        quality=args.quality,
        workers=args.workers,
        label_map=args.label_map,
        overwrite=args.overwrite,
        seed=args.seed,
    )
    if (args.shape or args.class_names) and not (args.pixels_csv or args.idx):
        raise ValueError("--shape and --class-names are for --pixels-csv and --idx")
    class_names = read_class_names(args.class_names)
    if args.folders:
        manifest = write_records_from_folders(
            args.folders, args.out, test=args.test, **common
        )
    elif args.pixels_csv:
        manifest = write_pixels_csv(
            args.pixels_csv,
            args.out,
            shape=args.shape,
            test=bool(args.test),
            class_names=class_names,
            **common,
        )
    elif args.idx:
        if len(args.idx) > 2:
            raise ValueError("--idx takes IMAGES and at most one LABELS file")
        images, labels = (*args.idx, None)[:2]
        labels = None if args.test else labels
        manifest = write_idx_records(images, labels, args.out, class_names, **common)
    else:
        manifest = write_records_from_csv(
            args.csv, args.images, args.out, test=bool(args.test), **common
        )
    for line in summary_lines(manifest, args.out):
        print(line)
    return 0


def cdiscount_command(args) -> int:
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


def train_command(args) -> int:
    cfg = config_from_args(args)
    common = dict(
        out_dir=args.out,
        time_limit=args.time_limit,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
    )
    if args.folds or args.fold is not None or cfg.data.folds:
        # (--resume-later is what a k-fold run does anyway: its limit is every
        # fold's, so it only stops one.)
        if args.tensorboard is not None or args.resume_stopped:
            raise ValueError(
                "--tensorboard and --resume-stopped are for single runs (in Python, "
                "train_folds(..., callbacks=[...]) hands callbacks to every fold)"
            )
        result = train_folds(cfg, folds=args.folds, fold=args.fold, **common)
    else:
        callbacks = []
        if args.tensorboard is not None:
            _check_tensorboard()
            logs = args.tensorboard or os.path.join(
                args.out or cfg.out_dir, "tensorboard"
            )
            callbacks.append(functools.partial(_tensorboard, logs))
        result = train(
            cfg,
            callbacks=callbacks,
            resume_stopped=args.resume_stopped,
            fit_to_time=not args.resume_later,
            **common,
        )
    print(json.dumps(result.metrics, indent=2))
    return 0


def predict_command(args) -> int:
    tta = tuple(v for v in args.tta.split(",") if v) if args.tta else None
    if (args.data is None) == (args.images is None):
        raise ValueError("predict needs --data RECORDS or --images DIR|CSV|FILE...")
    if args.images is not None:
        predict_files(
            args.images,
            run=args.run,
            model=args.model,
            out=args.out,
            format=args.format,
            probability=args.probability,
            tta=tta,
            reduce=args.reduce,
            batch_size=args.batch_size or 32,
            root=args.image_root,
            expected=args.expected,
            weights=args.weights,
            threads=args.threads,
        )
        return 0
    if args.run is None or args.model is not None:
        raise ValueError("predict --data reads a run: pass --run RUN (not --model)")
    predict_run(
        args.run,
        args.data,
        out=args.out,
        tta=tta,
        reduce=args.reduce,
        batch_size=args.batch_size,
        format=args.format,
        probability=args.probability,
        md5_dict=None if args.md5_dict == "none" else args.md5_dict,
        expected=args.expected,
        weights=args.weights,
        device=args.device,
    )
    return 0


def export_command(args) -> int:
    export(
        args.run,
        args.format,
        out=args.out,
        quantize=args.quantize,
        weights=args.weights,
        calibration=args.calibration,
        check=False if args.no_check else args.check,
        calibration_images=args.calibration_images,
        check_images=args.check_images,
    )
    return 0


def stack_command(args) -> int:
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


def sweep_command(args) -> int:
    run_sweep(
        config_from_args(args),
        args.grid,
        args.out,
        folds=args.folds,
        time_limit=args.time_limit,
        device=args.device,
    )
    return 0


def tune_command(args) -> int:
    tune(
        config_from_args(args),
        args.space,
        args.out,
        trials=args.trials,
        time_limit=args.time_limit,
        device=args.device,
    )
    return 0


def demo_command(args) -> int:
    metrics = run_demo(args.out, quick=args.quick, sets=args.sets, seed=args.seed)
    print(json.dumps(metrics, indent=2))
    return 0


def bench_command(args) -> int:
    result = run_bench(args.what, args)
    print(json.dumps(result, indent=2 if not args.json else None))
    return 0


def kernel_build_command(args) -> int:
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


def kernel_push_command(args) -> int:
    result = push_kernel(
        args.folder, accelerator=args.accelerator, timeout=args.timeout
    )
    for kind, items in result.invalid.items():
        print(f"warning: Kaggle did not accept these {kind}: {', '.join(items)}")
    print(f"pushed {result.slug} version {result.version}: {result.url}")
    return 0


def kernel_status_command(args) -> int:
    status = kernel_status(args.slug)
    print(f"{status.slug}: {status.status}")
    if status.failure_message:
        print(f"failure message: {status.failure_message}")
    return 1 if status.failed else 0
