"""The errors a weights source raises; each message is one line naming the file."""

from __future__ import annotations


class WeightsError(ValueError):
    """A weights source does not fit the model. The message is one line naming
    the file (or run folder) and what differs."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """No weights file or run folder at the given path."""


class WeightsUnavailableError(WeightsError, RuntimeError):
    """Pretrained weights could not be had: no internet for a download, or the
    package that ships them is not installed."""
