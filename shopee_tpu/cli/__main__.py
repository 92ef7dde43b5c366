"""``python -m shopee_tpu.cli``: the same as the ``shopee-tpu`` command."""

import sys

from shopee_tpu.cli import main

if __name__ == "__main__":
    sys.exit(main())
