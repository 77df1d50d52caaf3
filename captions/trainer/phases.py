"""The two phases of training, each owning its loss and its learning rate.

* ``CrossEntropy``: teacher forcing, the temporal cross-entropy of the reference captions (with
  label smoothing) plus the decoder's own auxiliary loss; learning rate on the ``schedule``.
* ``SelfCritical`` (Rennie et al. 2017): sampled captions rewarded by their CIDEr-D, from the
  cross-entropy epoch of the lowest val loss or the best val CIDEr; a constant learning rate.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from captions.errors import CaptionsError
from captions.models.base import caption_loss
from captions.models.checkpoint import load_checkpoint
from captions.trainer.data import caption_tokens
from captions.trainer.scst import self_critical_loss, train_references
from captions.trainer.state import CROSS_ENTROPY, SELF_CRITICAL

log = logging.getLogger("captions")

SCST_START = "scst_start.pt"  # the run's weights at its lowest cross-entropy val loss (scst_start="loss")


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier of the base learning rate at ``step`` of ``total``: cosine decays to 5 %, step
    halves at 50 % and 75 %, none stays at 1. Raises ``CaptionsError`` for another schedule."""
    if schedule == "none" or total <= 0:
        return 1.0
    frac = min(step / total, 1.0)
    if schedule == "cosine":
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))
    if schedule == "step":
        return 0.5 ** ((frac >= 0.5) + (frac >= 0.75))
    raise CaptionsError(f"unknown schedule '{schedule}' (cosine, step or none)")


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear learning-rate warm-up: (step + 1) / warmup_steps until it reaches 1 (1 when there is
    no warm-up), as Transformers are trained (Vaswani et al. 2017, with a linear ramp)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


@dataclass
class StepLoss:
    """One batch's loss (a scalar tensor with its graph), the captions it covered, and the mean
    reward of its samples (self-critical only)."""

    loss: torch.Tensor
    captions: int
    reward: float | None = None


class CrossEntropy:
    """Teacher-forced cross-entropy on the reference captions of each batch."""

    name = CROSS_ENTROPY
    gradients_reduced_by_ddp = True

    def __init__(self, run) -> None:
        self.run = run

    def lr_factor(self, step: int) -> float:
        """The schedule's factor, times the decoder's linear warm-up over its first steps."""
        cfg = self.run.cfg
        return lr_factor(cfg.schedule, step, self.run.total_steps) * warmup_factor(step, self.run.warmup_steps)

    def begin(self) -> None:
        """Nothing to set up: the run starts in this phase."""

    def loss(self, rows: np.ndarray, images: np.ndarray, image_index: np.ndarray, feats: torch.Tensor) -> StepLoss:
        """rows (N,) caption rows of a batch; images (M,) its distinct image ids; image_index (N,)
        the position of each caption's image among them; feats (M, ...) their features."""
        run = self.run
        caps = caption_tokens(run.ds, rows).to(run.device)
        with run.autocast():
            logits, alphas = run.model(feats, caps[:, :-1], image_index=torch.from_numpy(image_index).to(run.device))
        loss = caption_loss(logits, caps[:, 1:], run.cfg.loss, run.cfg.label_smoothing)
        aux = run.core.auxiliary_loss(alphas, caps[:, 1:])
        return StepLoss(loss if aux is None else loss + aux, len(rows))


class SelfCritical:
    """k sampled captions per image, each rewarded by its CIDEr-D minus the mean of the image's
    other samples (``captions.trainer.scst``)."""

    name = SELF_CRITICAL
    gradients_reduced_by_ddp = False  # sampling runs the module itself, outside DDP's hooks

    def __init__(self, run) -> None:
        self.run = run
        self.cider = None

    def lr_factor(self, step: int) -> float:
        return self.run.cfg.scst_lr / self.run.cfg.lr

    def begin(self) -> None:
        """Build the rewards' CIDEr-D scorer; on the phase's first epoch, continue from the chosen
        cross-entropy weights with fresh Adam moments (the policy gradient has another scale) and
        the constant self-critical learning rate."""
        run = self.run
        if self.cider is None:
            self.cider = train_references(run.ds, np.unique(run.ds.image_ids[run.train_rows]))
        if run.state.scst_from is None:
            self._start()

    def _start(self) -> None:
        run, cfg = self.run, self.run.cfg
        source = run.out / ("best.pt" if cfg.scst_start == "cider" else SCST_START)
        if source.exists():
            run.load_weights(load_checkpoint(source)["state_dict"])
        run.optimizer.state.clear()
        run.state.scst_from = int(run.scheduler.last_epoch)
        for group, base in zip(run.optimizer.param_groups, run.scheduler.base_lrs, strict=True):
            group["lr"] = base * run.lr_lambda(run.state.scst_from)
        log.info("self-critical training from %s, lr %g", self._start_description(), cfg.scst_lr)

    def _start_description(self) -> str:
        run = self.run
        if not len(run.val_ids):  # nothing to choose by: best.pt, when it is read, holds the last epoch
            return "the last cross-entropy epoch (no val split)"
        best = run.state.best
        if run.cfg.scst_start == "cider" and best.get("CIDEr") is not None:
            return f"the best epoch ({best['epoch']}, val CIDEr {best['CIDEr']:.4f})"
        if run.cfg.scst_start == "cider":  # CIDEr is undefined on this val split: the best epoch is by val loss
            return f"the best epoch ({best['epoch']}, val loss {best['val_loss']:.4f}; CIDEr undefined)"
        epoch, loss = run.state.lowest_val_loss
        return f"the epoch of the lowest val loss ({epoch}, {loss:.4f})"

    def loss(self, rows: np.ndarray, images: np.ndarray, image_index: np.ndarray, feats: torch.Tensor) -> StepLoss:
        run = self.run
        with run.autocast():
            loss, reward = self_critical_loss(run.core, feats, images, self.cider, run.ds.vocab.idx_to_token,
                                              run.cfg.scst_samples, run.ds.max_words + 1)
        return StepLoss(loss, len(images) * run.cfg.scst_samples, reward)
