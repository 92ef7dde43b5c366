"""What the steps of one ``train()`` call share: ``RunState``, set up by the loop
and read by its callbacks (``callbacks``, ``time_plan``) and its report.

A time limit's plan (``time_plan.FitToTime``) changes ``config.epochs`` and
``phases`` while a fit runs; everything else stays as the setup left it.
"""

from __future__ import annotations

from dataclasses import dataclass

from shopee_tpu.accelerator import Accelerator
from shopee_tpu.config import RunConfig
from shopee_tpu.run_folder import RunFolder
from shopee_tpu.training.plan import Phase

__all__ = ["RunRecords", "RunState"]


@dataclass
class RunRecords:
    """The TFRecord files a run trains and validates on.

    Attributes:
        train: The training files.
        valid: The validation files (empty: no validation).
        train_ids: The ids read of ``train`` (one fold of a k-fold run), or
            ``None`` for every record.
        valid_ids: The same for ``valid``.
    """

    train: list[str]
    valid: list[str]
    train_ids: list[str] | None = None
    valid_ids: list[str] | None = None


@dataclass
class RunState:
    """One run's setup, shared by the loop's steps, its callbacks and its report.

    Attributes:
        config: The run config; ``epochs`` is the planned count.
        acc: The accelerator it trains on.
        folder: The run folder.
        verbose: 1 prints progress (on the chief only), 0 is silent.
        start: ``time.monotonic()`` when the call began (for the time limit).
        label_map: ``{category: class_id}`` of the training records.
        records: The files and ids it trains and validates on.
        image_size: The full image size.
        n_train: Training records.
        n_valid: Validation records.
        steps: Steps per epoch.
        per_call: Steps per compiled call.
        phases: The phases of the planned epochs (``training.plan``).
        one_model: One model with an open input side trains every size.
        asked_epochs: The epochs asked before a time limit planned fewer.
    """

    config: RunConfig
    acc: Accelerator
    folder: RunFolder
    verbose: int
    start: float
    label_map: dict[str, int]
    records: RunRecords
    image_size: int
    n_train: int
    n_valid: int
    steps: int
    per_call: int
    phases: list[Phase]
    one_model: bool
    asked_epochs: int = 0

    @property
    def validate(self) -> bool:
        """Whether the run has validation records."""
        return bool(self.records.valid)

    def say(self, text: str) -> None:
        """Prints ``text`` after the run folder's path, when verbose."""
        if self.verbose:
            print(f"{self.folder.path}: {text}")
