"""Warnings about validation figures that cannot be trusted.

A validation split that sits too close to the training data (near-copies of
training images, crops of the same regions, images of one product on both sides)
scores like the training set and says nothing about new data. Two symptoms are cheap to see in the history, and ``train()`` reports them:

* validation accuracy at the ceiling (>= ``ceiling``): it cannot rank models, and
  usually means the split leaks;
* validation accuracy well above training accuracy at the end of the run. Early on,
  augmentation and the EMA of the weights make this normal, and with MixUp or
  CutMix the training accuracy is scored against mixed labels, so the gap is only
  checked on the last epoch and without mixing.

The cure is a split by group (product, source image, region): our records keep
each group in one shard, so the shard hold-out is one.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["validation_warnings"]


def validation_warnings(
    history: Sequence[dict],
    *,
    mixing: bool = False,
    margin: float = 0.1,
    ceiling: float = 0.995,
) -> list[str]:
    """Messages about suspicious validation figures in a run's history.

    Args:
        history: One row per epoch with ``accuracy`` and ``val_accuracy``.
        mixing: MixUp or CutMix was on (training accuracy is not comparable).
        margin: Warn when the last ``val_accuracy - accuracy`` exceeds this.
        ceiling: Warn when the best validation accuracy reaches this.

    Returns:
        Zero or more messages, each saying what was seen and what to check.
    """
    rows = [r for r in history if r.get("val_accuracy") is not None]
    if not rows:
        return []
    out = []
    best = max(rows, key=lambda r: r["val_accuracy"])
    if best["val_accuracy"] >= ceiling:
        out.append(
            f"validation accuracy reached {best['val_accuracy']:.4f} (epoch "
            f"{best['epoch']}): at the ceiling it cannot tell models apart, and it "
            "usually means validation images are near-copies of training images. "
            "Split by group (product, source photo), e.g. give the records a group "
            "column, or pass separate validation records (data.valid)."
        )
    last = rows[-1]
    gap = last["val_accuracy"] - last.get("accuracy", last["val_accuracy"])
    if not mixing and gap > margin:
        out.append(
            f"validation accuracy {last['val_accuracy']:.4f} exceeds training "
            f"accuracy {last['accuracy']:.4f} by {gap:.2f} at the last epoch: "
            "validation is easier than the training data, so it may overstate "
            "accuracy on new images. Check the split for shared groups or "
            "duplicates."
        )
    return out
