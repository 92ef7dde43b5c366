"""The ``shopee-tpu`` command line: a thin layer over the library functions.

``parser`` holds the table of commands and options, ``commands`` the call each one
makes; ``main`` runs one and turns a user's mistake into one line.
"""

from __future__ import annotations

import sys

from shopee_tpu.accelerator import AcceleratorNotFound
from shopee_tpu.cli.parser import build_parser, parse_duration
from shopee_tpu.config import ConfigError
from shopee_tpu.console import error_line, one_line_warnings, show_native_logs

__all__ = ["build_parser", "main", "parse_duration"]


# Errors a user causes (a wrong path, value or device, no internet for weights, a
# missing extra) end in one line; anything else is a bug and keeps its traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    errors = [OSError, ValueError, ImportError, AcceleratorNotFound]
    weights = sys.modules.get("shopee_tpu.models.weights.errors")  # raised once loaded
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
