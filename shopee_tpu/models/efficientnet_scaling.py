"""EfficientNet scaling rules: the official B0..B7 and Lite0..Lite4 tables, compound
scaling by phi, the filter and repeat rounding, and the drop-connect rate of each
block.

Pure Python (no Keras), so the rules can be unit-tested and reused (``input_spec``)
without building a model. Numbers and rules follow the TF reference
(tensorflow/tpu ``efficientnet_builder.py``), identical in keras.applications.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The B0 stage table (tensorflow/tpu efficientnet_builder.py, identical in
# keras.applications): kernel, repeats, filters in/out, expansion, stride, SE ratio.
B0_STAGES = (
    (3, 1, 32, 16, 1, 1, 0.25),
    (3, 2, 16, 24, 6, 2, 0.25),
    (5, 2, 24, 40, 6, 2, 0.25),
    (3, 3, 40, 80, 6, 2, 0.25),
    (5, 3, 80, 112, 6, 1, 0.25),
    (5, 4, 112, 192, 6, 2, 0.25),
    (3, 1, 192, 320, 6, 1, 0.25),
)
STEM_FILTERS, TOP_FILTERS, DEPTH_DIVISOR = 32, 1280, 8

# Official (width, depth, resolution, dropout): hand-picked, not alpha**phi etc.
OFFICIAL = {
    0: (1.0, 1.0, 224, 0.2),
    1: (1.0, 1.1, 240, 0.2),
    2: (1.1, 1.2, 260, 0.3),
    3: (1.2, 1.4, 300, 0.3),
    4: (1.4, 1.8, 380, 0.4),
    5: (1.6, 2.2, 456, 0.4),
    6: (1.8, 2.6, 528, 0.5),
    7: (2.0, 3.1, 600, 0.5),
}
# EfficientNet-Lite (tensorflow/tpu efficientnet/lite): the B0 stages without
# squeeze-and-excitation, ReLU6, and the stem, the head and the first and last
# stages' repeats left unscaled, so the models quantise well on mobile chips.
LITE = {
    0: (1.0, 1.0, 224, 0.2),
    1: (1.0, 1.1, 240, 0.2),
    2: (1.1, 1.2, 260, 0.3),
    3: (1.2, 1.4, 280, 0.3),
    4: (1.4, 1.8, 300, 0.3),
}
# Compound scaling (paper section 3.3): depth alpha**phi, width beta**phi,
# resolution gamma**phi times B0's 224.
ALPHA, BETA, GAMMA = 1.2, 1.1, 1.15
RESOLUTION_MULTIPLE = 8


@dataclass(frozen=True)
class Scaling:
    """Width and depth multipliers, native resolution and the official dropout."""

    name: str
    width: float
    depth: float
    resolution: int
    dropout: float
    variant: int | None = None  # 0..7 for official variants, else None
    lite: bool = False  # EfficientNet-Lite: no SE, ReLU6, fixed stem and head

    @property
    def activation(self) -> str:
        """The activation the variant was designed (and its weights trained) with."""
        return "relu6" if self.lite else "swish"

    @property
    def se_ratio(self) -> float:
        return 0.0 if self.lite else 0.25

    @property
    def stem_filters(self) -> int:
        return STEM_FILTERS if self.lite else round_filters(STEM_FILTERS, self.width)

    @property
    def top_filters(self) -> int:
        return TOP_FILTERS if self.lite else round_filters(TOP_FILTERS, self.width)

    def repeats(self) -> list[int]:
        """Blocks in each stage of ``B0_STAGES`` (Lite keeps the first and the
        last stage as in B0)."""
        last = len(B0_STAGES) - 1
        return [
            stage[1]
            if self.lite and i in (0, last)
            else round_repeats(stage[1], self.depth)
            for i, stage in enumerate(B0_STAGES)
        ]


def scaling(variant: int | float | str) -> Scaling:
    """Coefficients of a variant.

    Args:
        variant: An ``int`` 0..7 (or ``"b0".."b7"``) picks the official B0..B7 row,
            ``"lite0".."lite4"`` the EfficientNet-Lite row. A
            ``float`` is a compound-scaling ``phi``: width ``1.1**phi``, depth
            ``1.2**phi`` and resolution ``224 * 1.15**phi`` rounded to the nearest
            multiple of 8 (at least 32). ``phi`` may be negative (tiny models) or
            fractional. Note ``1`` (B1, hand-picked) differs from ``1.0`` (phi = 1).

    Raises:
        ValueError: an int outside 0..7 or an unparsable string.
    """
    if isinstance(variant, str):
        text = variant.strip().lower()
        if text.startswith("lite") and text[4:].isdigit():
            n = int(text[4:])
            if n not in LITE:
                raise ValueError(
                    f"EfficientNet variant {variant!r}: expected lite0..lite4"
                )
            w, d, r, p = LITE[n]
            return Scaling(f"efficientnet-lite{n}", w, d, r, p, None, lite=True)
        if text.startswith("b") and text[1:].isdigit():
            variant = int(text[1:])
        else:
            try:
                variant = float(text.removeprefix("phi"))
            except ValueError:
                raise ValueError(
                    f"EfficientNet variant {variant!r}: expected 'b0'..'b7', "
                    "'lite0'..'lite4' or 'phi<value>'"
                ) from None
    if isinstance(variant, bool):
        raise ValueError(f"EfficientNet variant {variant!r}: expected an int or float")
    if isinstance(variant, int):
        if variant not in OFFICIAL:
            raise ValueError(f"EfficientNet variant {variant}: expected 0..7 (B0..B7)")
        w, d, r, p = OFFICIAL[variant]
        return Scaling(f"efficientnet-b{variant}", w, d, r, p, variant)
    phi = float(variant)
    if not math.isfinite(phi) or abs(phi) > 12:
        raise ValueError(
            f"EfficientNet phi {phi}: expected a finite value in [-12, 12]"
        )
    res = max(
        32, int(round(224 * GAMMA**phi / RESOLUTION_MULTIPLE)) * RESOLUTION_MULTIPLE
    )
    # No official dropout exists for phi; B0's is a sane default for the option.
    return Scaling(f"efficientnet-phi{phi:g}", BETA**phi, ALPHA**phi, res, 0.2)


def round_filters(filters: int, width: float, divisor: int = DEPTH_DIVISOR) -> int:
    """Scales channels by ``width``, rounds to a multiple of ``divisor`` (at least
    ``divisor``), and adds one ``divisor`` if rounding lost more than 10 %."""
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    """Scales a stage's block count by ``depth``, rounding up."""
    return int(math.ceil(depth * repeats))


def block_count(variant: int | float | str) -> int:
    """Total MBConv blocks after depth scaling (B0: 16, B7: 55)."""
    return sum(scaling(variant).repeats())


def drop_connect_rates(variant: int | float | str, rate: float = 0.2) -> list[float]:
    """Stochastic-depth rate of each block: ``rate * b / total`` over the *scaled*
    block count (``b`` from 0), as the TF reference; the last is
    ``rate * (n - 1) / n``. Blocks without a residual never drop."""
    n = block_count(variant)
    return [rate * b / n for b in range(n)]
