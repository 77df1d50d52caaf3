"""``TrainState``: where a training run is, saved in every checkpoint and restored on resume."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

CROSS_ENTROPY, FINE_TUNE, SELF_CRITICAL = "cross-entropy", "fine-tune", "self-critical"


@dataclass
class TrainState:
    """Progress of a run.

    ``epoch``: epochs finished (0-based index of the next one); ``step_in_epoch``: steps of that
    epoch already taken (a resumed run skips them); ``best``: val metrics of the best epoch by
    CIDEr (``{"CIDEr": -1, "epoch": -1}`` before any); ``bad_epochs``: epochs since it improved;
    ``lowest_val_loss``: (epoch, loss) of the lowest cross-entropy val loss; ``scst_from``: the
    global step where self-critical training began (None before); ``ft_from``: the
    global step where the encoder fine-tune phase began (None before, or without one); ``early_stopped``: the run is
    over; ``epoch_progress``: the statistics of the epoch so far; ``metrics_bytes``: the length of
    metrics.jsonl with the rows of the finished epochs (None in checkpoints from before it was
    recorded), so that a resumed run drops rows an uncommitted epoch appended. The keys of
    ``state_dict`` are the checkpoint's own (format version 1).
    """

    epoch: int = 0
    step_in_epoch: int = 0
    best: dict[str, Any] = field(default_factory=lambda: {"CIDEr": -1.0, "epoch": -1})
    bad_epochs: int = 0
    lowest_val_loss: tuple[int, float] = (-1, math.inf)
    scst_from: int | None = None
    ft_from: int | None = None
    early_stopped: bool = False
    # the unfinished epoch's running loss, captions, rewards and seconds, so that a resumed epoch
    # logs what an uninterrupted one would
    epoch_progress: dict[str, Any] = field(default_factory=dict)
    metrics_bytes: int | None = 0

    def phase(self, scst_epoch: int, fine_tune_epochs: int = 0) -> str:
        """The phase of the current epoch: cross-entropy before epoch index ``scst_epoch``, then
        ``fine_tune_epochs`` of fine-tuning, then self-critical."""
        if self.epoch < scst_epoch:
            return CROSS_ENTROPY
        return FINE_TUNE if self.epoch < scst_epoch + fine_tune_epochs else SELF_CRITICAL

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "best": dict(self.best),
                "bad_epochs": self.bad_epochs, "lowest_val_loss": list(self.lowest_val_loss),
                "scst_from": self.scst_from, "ft_from": self.ft_from, "early_stopped": self.early_stopped,
                "epoch_progress": dict(self.epoch_progress), "metrics_bytes": self.metrics_bytes}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore from a checkpoint (older ones lack lowest_val_loss, scst_from, early_stopped,
        epoch_progress, metrics_bytes)."""
        self.epoch, self.step_in_epoch = int(d["epoch"]), int(d["step_in_epoch"])
        self.best, self.bad_epochs = dict(d["best"]), int(d["bad_epochs"])
        self.lowest_val_loss = tuple(d.get("lowest_val_loss", (-1, math.inf)))  # type: ignore[assignment]
        self.scst_from = d.get("scst_from")
        self.ft_from = d.get("ft_from")
        self.early_stopped = bool(d.get("early_stopped", False))
        self.epoch_progress = dict(d.get("epoch_progress") or {})
        self.metrics_bytes = d.get("metrics_bytes")
