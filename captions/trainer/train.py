"""``captions train``: fit a decoder from the feature cache (the CNN runs only in the fine-tune phase).

``train()`` reads as its steps: open (or resume) the run; for each epoch enter its phase
(cross-entropy, then with ``--fine-tune-encoder`` the fine-tune phase, then self-critical),
``train_one_epoch``, ``end_of_epoch`` (val evaluation, the pure ``decide`` step: best epoch,
early stopping, phase switch; then the epoch's files).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import weakref
from collections.abc import Callable, Collection, Iterator
from contextlib import closing, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captions.distributed import average_gradients, launch_rank, leave, main_rank_logs
from captions.errors import OutputError, output_error
from captions.fsutil import fault_point, folder_lock, write_json_atomic
from captions.models.checkpoint import save_checkpoint
from captions.runtime import retained_heap
from captions.trainer.commit import RESUME_HINT, append_row, apply_staged, staging_dir
from captions.trainer.config import TrainConfig
from captions.trainer.control import StopFlag, TrainingInterrupted
from captions.trainer.data import images_of_batch
from captions.trainer.evaluation import evaluate_split
from captions.trainer.phases import SCST_START, CrossEntropy, FineTune, SelfCritical
from captions.trainer.session import TrainingRun
from captions.trainer.state import CROSS_ENTROPY, FINE_TUNE, SELF_CRITICAL, TrainState

log = logging.getLogger("captions")

__all__ = ["SCST_START", "TrainConfig", "TrainingInterrupted", "train", "train_one_epoch", "end_of_epoch", "decide"]

Phase = CrossEntropy | FineTune | SelfCritical
_SAID_LOSS_FALLBACK: weakref.WeakSet = weakref.WeakSet()  # runs told that the val loss stands in for CIDEr


@dataclass
class EpochStats:
    """What one epoch of training measured: the running loss (0.98 EMA over steps), the captions
    seen by this rank, the rewards of self-critical steps, and the seconds it took."""

    running_loss: float | None = None
    captions: int = 0
    rewards: list[float] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class EpochDecision:
    """The outcome of an epoch's val metrics: whether it is the best so far, whether its val loss is
    the lowest cross-entropy one, whether the run stops, and the epoch to run next."""

    improved: bool
    lower_loss: bool
    stop: bool
    next_epoch: int
    bad_epochs: int
    by: str = "CIDEr"  # what "best" meant: val CIDEr, or "val loss" where CIDEr is undefined


def train(data_dir: str | os.PathLike, features: str | os.PathLike, out_dir: str | os.PathLike,
          cfg: TrainConfig | None = None, resume: bool = False, progress: bool = True,
          step_callback: Callable[[int], None] | None = None, given: Collection[str] | None = None
          ) -> dict[str, Any]:
    """Train ``cfg.model`` on the train split, evaluating on val after each epoch.

    Writes ``out_dir/last.pt`` (every ``checkpoint_every`` steps and each epoch), ``best.pt``
    (best val CIDEr), ``scst_start.pt`` (lowest val loss, when self-critical training starts from
    it), ``metrics.jsonl`` and ``config.json`` (the resolved settings). ``resume`` continues from
    ``last.pt`` exactly where it stopped; ``given`` names the settings of ``cfg`` the caller chose
    (None: all of them): on resume those that may change are applied (``resumed_config``), and
    one that may not is refused. Returns {"best": {...}, "epochs_run": n, "out": path} (and
    "stopped_before": True when a resumed run had already stopped early: nothing was trained).
    Under torchrun (WORLD_SIZE > 1) it joins the process group, creating it if none exists yet;
    one it created is destroyed when training finishes; ranks other than 0 log only warnings.

    Raises ``CaptionsError`` for unusable inputs (another dataset, other features, a run already
    in ``out_dir`` without ``resume``, another run writing ``out_dir`` now), ``OutputError`` (one
    line: the file, the system's reason) when a file cannot be written (the committed epochs are
    kept: ``--resume`` continues) and ``TrainingInterrupted`` after Ctrl-C (checkpoint saved).
    """
    with run_lock(Path(out_dir)), main_rank_logs():
        try:
            run, finished = TrainingRun.open(data_dir, features, out_dir, cfg or TrainConfig(), resume, given)
            if run is None:
                return finished
            return run_training(run, progress, step_callback)
        except OutputError as e:  # a full or read-only disk: what was committed stays, the rest is redone
            raise OutputError(f"{e}; {RESUME_HINT}") from None


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.train.lock`` (``captions.fsutil.folder_lock``: an OS file lock, released even
    when the process is killed) for the whole run, on rank 0; a second run into ``out`` is refused
    in one line naming the lock and its holder. A run directory this call created and left empty
    is removed. Raises ``OutputError`` when ``out`` cannot be created (a read-only folder)."""
    if launch_rank() != 0:
        yield
        return
    created = not out.exists()
    try:
        with folder_lock(out, "train"):
            yield
    finally:
        if created and out.is_dir() and not any(p.name != ".train.lock" for p in out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)


def run_training(run: TrainingRun, progress: bool = True,
                 step_callback: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The epochs of an opened run, then its clean-up; returns ``run.result()``."""
    if run.dist.is_main:
        try:
            write_json_atomic(run.out / "config.json", run.cfg.resolved())
        except OSError as e:
            raise output_error(run.out / "config.json", e) from None
        fault_point("train", "config")
    writer = tensorboard_writer(run.out) if run.dist.is_main else None
    run.model.train()
    # closing: the fine-tune phase's decode workers end with the run, also when it is interrupted
    with StopFlag() as flag, retained_heap() if run.device.type == "cpu" else nullcontext(), \
            closing(run.phases[FINE_TUNE]):
        while run.state.epoch < run.total_epochs:
            phase = run.phase()
            phase.begin()
            stats = train_one_epoch(run, phase, flag, progress, step_callback)
            if end_of_epoch(run, phase, stats, writer):
                break
    if writer is not None:
        writer.close()
    run.cache.close()
    leave(run.dist)
    return run.result()


def train_one_epoch(run: TrainingRun, phase: Phase, flag: StopFlag, progress: bool = True,
                    step_callback: Callable[[int], None] | None = None) -> EpochStats:
    """One epoch of ``phase`` from ``run.state.step_in_epoch`` on; saves ``last.pt`` every
    ``checkpoint_every`` steps and, on Ctrl-C, at the step where it stopped (then raises
    ``TrainingInterrupted``)."""
    from tqdm import tqdm

    state, batches = run.state, run.epoch_batches(run.state.epoch)
    scst = phase.name == SELF_CRITICAL
    if phase.name == FINE_TUNE:
        phase.start_epoch(batches, state.step_in_epoch)
    label = "" if phase.name == CROSS_ENTROPY else f" {phase.name}"
    bar = tqdm(total=len(batches), initial=state.step_in_epoch, unit="batch",
               disable=not progress or not run.dist.is_main, desc=f"epoch {state.epoch + 1}/{run.total_epochs}{label}")
    stats = EpochStats(**state.epoch_progress) if state.step_in_epoch else EpochStats()
    t0, before = time.perf_counter(), stats.seconds
    for k in range(state.step_in_epoch, len(batches)):
        if run.store.block_images is not None and k + 1 < len(batches):
            run.store.prefetch(int(run.ds.image_ids[batches[k + 1][0]]) // run.store.block_images)
        value = train_step(run, phase, batches[k], stats)
        stats.running_loss = value if stats.running_loss is None else 0.98 * stats.running_loss + 0.02 * value
        bar.update(1)
        bar.set_postfix(loss=f"{stats.running_loss:.3f}",
                        caps_s=f"{stats.captions * run.dist.world / (before + time.perf_counter() - t0):.0f}",
                        **({"reward": f"{np.mean(stats.rewards[-20:]):.3f}"} if scst else {}))
        if step_callback is not None:
            step_callback(int(run.scheduler.last_epoch))
        if flag.stop or (run.cfg.checkpoint_every and (k + 1) % run.cfg.checkpoint_every == 0):
            state.step_in_epoch = k + 1
            stats.seconds = before + time.perf_counter() - t0
            state.epoch_progress = asdict(stats)
            if run.dist.is_main:
                run.save("last.pt")
                fault_point("train", "checkpoint")
            if flag.stop:
                bar.close()
                raise TrainingInterrupted(f"interrupted at epoch {state.epoch + 1}, step {k + 1}; saved "
                                          f"{run.out / 'last.pt'}; continue with --resume")
    bar.close()
    if phase.name == FINE_TUNE:
        phase.close()
    stats.seconds = before + time.perf_counter() - t0
    state.epoch_progress = {}
    return stats


def train_step(run: TrainingRun, phase: Phase, rows: np.ndarray, stats: EpochStats) -> float:
    """One optimizer step on the caption ``rows`` of a batch (in the fine-tune phase the encoder's
    too, its gradients averaged over the ranks and clipped with the decoder's); returns its loss."""
    encoder = run.encoder if phase.name == FINE_TUNE else None
    if encoder is not None:  # images decoded and encoded per batch (those unreadable now left out)
        rows, images, image_index, feats = phase.batch(rows)
    else:
        images, image_index = images_of_batch(run.ds.image_ids[rows])
        feats = run.store.gather(images)
    step = phase.loss(rows, images, image_index, feats)
    stats.captions += step.captions
    if step.reward is not None:
        stats.rewards.append(step.reward)
    run.optimizer.zero_grad(set_to_none=True)
    if encoder is not None:
        encoder.optimizer.zero_grad(set_to_none=True)
    step.loss.backward()
    if not phase.gradients_reduced_by_ddp:
        average_gradients(run.dist, run.core.parameters())
    if encoder is not None:
        average_gradients(run.dist, encoder.params)
    if run.cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([*run.core.parameters(), *(encoder.params if encoder else [])],
                                       run.cfg.grad_clip)
    run.optimizer.step()
    if encoder is not None:
        encoder.optimizer.step()
        encoder.scheduler.step()
    if run.ema is not None:
        run.ema.update_parameters(run.core)
    run.scheduler.step()
    return step.loss.item()


def decide(state: TrainState, row: dict[str, Any], cfg: TrainConfig, scst: bool, has_val: bool,
           phase: str | None = None) -> EpochDecision:
    """The end-of-epoch decision from the epoch's val ``row`` (pure). Best epoch: the highest val
    CIDEr, or, where CIDEr is undefined (``row["CIDEr"]`` None: fewer than two val images), the
    lowest val loss: an undefined metric never selects or stops (every epoch is best without a
    val split); early stopping after ``patience`` epochs without a better one, per phase; a phase
    ends early or on time into the next one (cross-entropy -> fine-tune when ``fine_tune_epochs``
    > 0 -> self-critical when ``scst_epochs`` > 0). ``phase``: the epoch's phase (default: from
    ``scst``)."""
    by = "val loss" if has_val and row.get("CIDEr") is None else "CIDEr"
    if not has_val:
        improved = True
    elif by == "CIDEr":
        best = state.best.get("CIDEr")
        improved = best is None or row["CIDEr"] > best
    else:
        improved = row["val_loss"] < state.best.get("val_loss", math.inf)
    bad = 0 if improved else state.bad_epochs + 1
    stop = has_val and bad >= cfg.patience
    next_epoch = state.epoch + 1
    phase = phase or (SELF_CRITICAL if scst else CROSS_ENTROPY)
    tune_end = cfg.epochs + cfg.fine_tune_epochs
    if phase == CROSS_ENTROPY and (stop or next_epoch == cfg.epochs) and tune_end + cfg.scst_epochs > cfg.epochs:
        next_epoch, stop, bad = cfg.epochs, False, 0  # on to fine-tuning or self-critical training
    elif phase == FINE_TUNE and (stop or next_epoch == tune_end) and cfg.scst_epochs > 0:
        next_epoch, stop, bad = tune_end, False, 0  # on to self-critical training
    lower = phase == CROSS_ENTROPY and has_val and row["val_loss"] < state.lowest_val_loss[1]
    return EpochDecision(improved, lower, stop, next_epoch, bad, by)


def apply_decision(state: TrainState, row: dict[str, Any], d: EpochDecision) -> None:
    """Move ``state`` past the epoch of ``row`` as ``d`` decided."""
    if d.improved:
        state.best = {k: row[k] for k in ("epoch", "val_loss", "BLEU-4", "CIDEr") if k in row}
    state.bad_epochs = d.bad_epochs
    if d.lower_loss:
        state.lowest_val_loss = (state.epoch + 1, row["val_loss"])
    state.epoch, state.step_in_epoch, state.early_stopped = d.next_epoch, 0, d.stop


def epoch_row(run: TrainingRun, phase: Phase, stats: EpochStats) -> dict[str, Any]:
    """The epoch's metrics row: train loss (and reward), lr, speed, and the val evaluation."""
    world = run.dist.world
    row: dict[str, Any] = {"epoch": run.state.epoch + 1, "phase": phase.name, "train_loss": stats.running_loss,
                           "lr": run.scheduler.get_last_lr()[0],
                           "captions_per_s": stats.captions * world / max(stats.seconds, 1e-9),
                           "time_s": stats.seconds}
    if phase.name == SELF_CRITICAL:
        row["train_reward"] = float(np.mean(stats.rewards)) if stats.rewards else None
    if len(run.val_ids):
        store, ids, rows = run.store, run.val_ids, run.val_rows
        if phase.name == FINE_TUNE:  # the encoder as it is now, on the val images that can still be read
            store = phase.val_store()
            ids, rows = store.covering(ids, rows, run.ds.image_ids)
        row.update(evaluate_split(run.shipped, run.ds, store, "val", run.cfg.loss, run.cfg.eval_batch_size,
                                  run.device, ids, rows))
    return row


def end_of_epoch(run: TrainingRun, phase: Phase, stats: EpochStats, writer=None) -> bool:
    """Evaluate, decide and commit the epoch (rank 0), share the decision with the other ranks, and
    return whether the run stops."""
    state, cfg = run.state, run.cfg
    run.epochs_run = state.epoch + 1
    stop, next_epoch = False, state.epoch + 1
    if run.dist.is_main:
        row = epoch_row(run, phase, stats)
        d = decide(state, row, cfg, phase.name == SELF_CRITICAL, len(run.val_ids) > 0, phase.name)
        apply_decision(state, row, d)
        commit_epoch(run, row, d, writer)
        stop, next_epoch = d.stop, d.next_epoch
    if run.dist.world > 1:
        shared = [stop, next_epoch]
        torch.distributed.broadcast_object_list(shared, src=0)
        stop, next_epoch = shared
        state.epoch, state.step_in_epoch = next_epoch, 0
    return stop


def commit_epoch(run: TrainingRun, row: dict[str, Any], d: EpochDecision, writer=None) -> None:
    """Write the epoch's outputs as one commit (``captions.trainer.commit``): its metrics row,
    best.pt and scst_start.pt when the epoch is theirs (staged), then last.pt, which commits
    them, then the staged files move into place; then TensorBoard scalars and the log lines. A
    run killed before last.pt is written redoes the epoch on resume; one killed after it has the
    moves finished. Raises ``OutputError`` when a file cannot be written (nothing is committed)."""
    cfg, out = run.cfg, run.out
    samples = row.pop("samples", [])
    run.state.metrics_bytes = append_row(out, row)
    fault_point("train", "metrics")
    ckpt = run.checkpoint()
    staged = staging_dir(out, run.state.epoch)
    for name, due in (("best.pt", d.improved),
                      (SCST_START, d.lower_loss and cfg.scst_epochs + cfg.fine_tune_epochs > 0
                       and cfg.scst_start == "loss")):
        if due:
            save_checkpoint(staged / name, ckpt)
            fault_point("train", "staged")
    run.save("last.pt", ckpt)
    fault_point("train", "commit")
    apply_staged(out, staged)
    report_epoch(run, row, d, samples, writer)


def report_epoch(run: TrainingRun, row: dict[str, Any], d: EpochDecision, samples: list[str], writer=None) -> None:
    """The committed epoch's TensorBoard scalars and log lines (metrics, val samples, early stop)."""
    if writer is not None:
        for key, v in row.items():
            if key != "epoch" and isinstance(v, float):
                writer.add_scalar(key, v, row["epoch"])
    log.info("epoch %d: %s", row["epoch"], ", ".join(
        f"{k} {v:.4g}" for k, v in row.items() if k != "epoch" and isinstance(v, float)))
    for s in samples:
        log.info("  val sample: %s", s)
    if d.by != "CIDEr" and run not in _SAID_LOSS_FALLBACK:
        _SAID_LOSS_FALLBACK.add(run)
        log.warning("val CIDEr is undefined with %d val image(s) (it needs two): the best epoch and early stopping "
                    "follow the val loss instead", len(run.val_ids))
    if d.stop:
        best = run.state.best
        key = "CIDEr" if d.by == "CIDEr" else "val_loss"
        log.info("early stop: val %s has not improved for %d epochs (best %.4f at epoch %d)",
                 d.by.removeprefix("val "), run.state.bad_epochs, best[key], best["epoch"])


def tensorboard_writer(out: Path):
    """A TensorBoard SummaryWriter in ``out/tb`` when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tb"))
