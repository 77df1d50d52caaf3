"""The phases of training, each owning its loss and its learning rate.

* ``CrossEntropy``: teacher forcing, the temporal cross-entropy of the reference captions (with
  label smoothing) plus the decoder's own auxiliary loss; learning rate on the ``schedule``.
* ``FineTune`` (``--fine-tune-encoder``): the same loss, on features the backbone computes from
  the batch's images with its upper blocks trained too (``captions.trainer.encoder``), as
  Show-Attend-Tell re-implementations and neuraltalk2 fine-tune the CNN once the decoder has
  learned from frozen features; both learning rates cosine-decayed over the phase.
* ``SelfCritical`` (Rennie et al. 2017): sampled captions rewarded by their CIDEr-D, from the
  cross-entropy epoch of the lowest val loss or the best val CIDEr; a constant learning rate.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from captions.errors import CaptionsError
from captions.models.base import caption_loss
from captions.models.checkpoint import load_checkpoint
from captions.trainer.data import caption_tokens, images_of_batch
from captions.trainer.scst import self_critical_loss, train_references
from captions.trainer.state import CROSS_ENTROPY, FINE_TUNE, SELF_CRITICAL

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


def load_chosen_epoch(run) -> Path | None:
    """Load the cross-entropy weights ``scst_start`` chooses (``best.pt`` or ``scst_start.pt``) for
    the phase that begins now; returns the file read, or None when it was not written (the weights
    in memory stay)."""
    source = run.out / ("best.pt" if run.cfg.scst_start == "cider" else SCST_START)
    if not source.exists():
        return None
    run.load_weights(load_checkpoint(source)["state_dict"])
    return source


def restart_optimizer(run, factor: float) -> None:
    """For a phase beginning now: fresh Adam moments and every group's learning rate at
    ``factor`` times its base."""
    run.optimizer.state.clear()
    for group, base in zip(run.optimizer.param_groups, run.scheduler.base_lrs, strict=True):
        group["lr"] = base * factor


class FineTune(CrossEntropy):
    """Cross-entropy with the encoder's upper blocks trained too, on images decoded per batch."""

    name = FINE_TUNE

    def __init__(self, run) -> None:
        super().__init__(run)
        self._crops = None
        self.unreadable: set[int] = set()  # images readable at extraction that no longer are (left out)

    def lr_factor(self, step: int) -> float:
        """The fine-tune decoder learning rate (relative to ``lr``), cosine over the phase's steps."""
        run, cfg = self.run, self.run.cfg
        scale = cfg.fine_tune_decoder_lr / cfg.lr if cfg.lr > 0 else 0.0
        return scale * lr_factor("cosine", step - (run.state.ft_from or 0), run.fine_tune_steps)

    def begin(self) -> None:
        """On the phase's first epoch: start from the chosen cross-entropy epoch (as self-critical
        training would; not with ``--init-from``, whose weights are already loaded)."""
        run = self.run
        if run.state.ft_from is None:
            if not run.cfg.init_from:
                log.info("encoder fine-tuning from %s", load_chosen_epoch(run) or "the weights in memory")
            run.state.ft_from = int(run.scheduler.last_epoch)
            restart_optimizer(run, self.lr_factor(run.state.ft_from))  # the encoder's features move under it

    def start_epoch(self, batches: list[np.ndarray], first: int) -> None:
        """Start decoding the images of ``batches[first:]`` (the epoch's remaining steps)."""
        run = self.run
        images = [images_of_batch(run.ds.image_ids[b])[0] for b in batches[first:]]
        self._crops = iter(run.encoder.loader(run.image_paths, images, run.cfg.augment, run.cfg.fine_tune_workers,
                                              (run.cfg.seed, run.state.epoch), offset=first))

    def close(self) -> None:
        """Stop the epoch's decode workers (at its end, or when the run stops)."""
        self._crops = None

    def batch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
        """The next batch of caption ``rows`` (N,) -> (its rows whose image could be read, their
        distinct images (M,), each row's image position (N',), the encoder's features (M, ...)
        with their graph). An image that can no longer be read is logged once and its captions
        left out of the step. Raises ``CaptionsError`` when none of the batch's images can be read."""
        run = self.run
        images, _ = images_of_batch(run.ds.image_ids[rows])
        crops, failed = next(self._crops)
        for image, why in failed:
            if image not in self.unreadable:
                self.unreadable.add(image)
                log.warning("skipped %s in the fine-tune phase: unreadable image (%s); it was readable at "
                            "extraction (%d such image(s) so far)", run.image_paths[image], why, len(self.unreadable))
        if crops is None:
            image, why = failed[0]
            raise CaptionsError(f"none of the {len(images)} images of a fine-tune batch can be read any more, "
                                f"e.g. this one ({why})", run.image_paths[image])
        if failed:
            bad = np.isin(run.ds.image_ids[rows], [image for image, _ in failed])
            rows = rows[~bad]
        images, image_index = images_of_batch(run.ds.image_ids[rows])
        return rows, images, image_index, run.encoder.features(crops, run.core.uses_spatial, run.autocast())

    def val_store(self):
        """The val images' features from the encoder as it is now."""
        run = self.run
        return run.encoder.store(run.image_paths, run.val_ids, run.core.uses_spatial)


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
        if run.state.ft_from is not None:
            run.use_tuned_features()
        if run.state.scst_from is None:
            self._start()

    def _start(self) -> None:
        run, cfg = self.run, self.run.cfg
        if run.state.ft_from is None:
            load_chosen_epoch(run)
            what = self._start_description()
        else:  # the decoder that goes with the fine-tuned encoder: the one in memory
            what = "the last fine-tune epoch"
        run.state.scst_from = int(run.scheduler.last_epoch)
        restart_optimizer(run, run.lr_lambda(run.state.scst_from))
        log.info("self-critical training from %s, lr %g", what, cfg.scst_lr)

    def _start_description(self) -> str:
        run = self.run
        if run.cfg.init_from and run.state.lowest_val_loss[0] < 0:
            return f"the weights of {run.cfg.init_from} (--init-from)"
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
