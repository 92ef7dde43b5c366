"""The options of ``shopee-tpu bench``: each names the benchmarks it applies to."""

from __future__ import annotations

from shopee_tpu.bench import BENCHES
from shopee_tpu.cli import commands


def add_bench_parser(sub) -> None:
    """Adds ``bench WHAT [options]`` to the ``shopee-tpu`` subcommands ``sub``."""
    p = sub.add_parser("bench", help="benchmarks that print JSON")
    p.add_argument("what", choices=tuple(BENCHES))
    p.add_argument("--json", action="store_true", help="compact JSON on one line")
    p.add_argument(
        "--images",
        default=None,
        help="bench input: a folder of JPEGs, searched recursively (default: "
        "synthetic photos)",
    )
    p.add_argument(
        "--min-side",
        type=int,
        default=0,
        help="bench input: use only JPEGs whose shorter side has this many px",
    )
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
    p.add_argument(
        "--seeds", default=None, help="bench accuracy, fashion: e.g. 0,1,2 (default)"
    )
    p.add_argument(
        "--split",
        choices=("tuning", "final"),
        default=None,
        help="bench accuracy, fashion: the images to tune on, or to report (default)",
    )
    p.add_argument(
        "--setting",
        choices=("scratch", "pretrained", "both"),
        default=None,
        help="bench accuracy: from random weights, from ImageNet Lite0, or both",
    )
    p.add_argument("--out", default=None, help="work folder (default: a temp dir)")
    p.add_argument(
        "--products", type=int, default=None, help="bench cdiscount: products (1x)"
    )
    p.add_argument(
        "--data",
        default=None,
        help="bench fashion: the folder of Fashion-MNIST's idx files (default: "
        "/usr/share/datasets/fashion-mnist, then ~/.keras/datasets/fashion-mnist)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="bench accuracy, fashion: seconds of wall time for each contender "
        "and seed, prediction included (default: the setting's; fashion 780; "
        "accuracy 0: none, for tuning at fixed epochs)",
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="bench accuracy, fashion: override our preset (repeatable)",
    )
    p.add_argument(
        "--peer-set",
        dest="peer_sets",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="bench accuracy: override the peer's recipe, e.g. epochs=40",
    )
    p.set_defaults(func=commands.bench_command)
