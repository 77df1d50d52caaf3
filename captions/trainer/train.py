"""``captions train``: fit a decoder from the feature cache (the CNN never runs here)."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captions.decoding import greedy_decode
from captions.errors import CaptionsError
from captions.features.cache import FeatureCache
from captions.metrics import score_captions
from captions.pipeline.prepared import PreparedDataset, load_prepared
from captions.pipeline.vocab import NULL_ID, decode_captions
from captions.runtime import resolve_device, resolve_precision, retained_heap
from captions.trainer.checkpoint import feature_meta, load_checkpoint, save_checkpoint
from captions.trainer.config import TrainConfig
from captions.trainer.data import FeatureStore, epoch_batches, images_of_batch
from captions.trainer.models import DecoderConfig, build_decoder, caption_loss, doubly_stochastic_penalty
from captions.trainer.scst import self_critical_loss, train_references

log = logging.getLogger("captions")

SCST_START = "scst_start.pt"  # the run's weights at its lowest cross-entropy val loss (scst_start="loss")


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier of the base learning rate at ``step`` of ``total``: cosine decays to 5 %, step
    halves at 50 % and 75 %, none stays at 1."""
    if schedule == "none" or total <= 0:
        return 1.0
    frac = min(step / total, 1.0)
    if schedule == "cosine":
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))
    if schedule == "step":
        return 0.5 ** ((frac >= 0.5) + (frac >= 0.75))
    raise CaptionsError(f"unknown schedule '{schedule}' (cosine, step or none)")


def train_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The training autocast dtype (None: plain fp32).

    ``auto``: bf16 on CUDA with bf16 and on CPUs with native bf16 (AVX512-BF16/AMX: 2.2x faster
    for attn here, benchmarks/README.md), else fp32. Weights, optimizer state, the loss and the
    LSTM cell state stay fp32. fp16 is not offered: it would need loss scaling.
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise CaptionsError(f"unknown training precision '{precision}' (auto, fp32 or bf16)")
    if precision == "auto" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return None
    return resolve_precision(precision, device)


def ema_update(decay: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """AveragedModel's avg_fn for an exponential moving average whose decay warms up as
    min(decay, (1 + n) / (10 + n)) after n updates, so the random initial weights fade within
    tens of steps instead of 1 / (1 - decay)."""
    def update(avg: torch.Tensor, param: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        return avg * d + param.detach() * (1.0 - d)
    return update


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _StopFlag:
    """Ctrl-C during training sets a flag checked between steps, so the checkpoint saved on the
    way out is always at a clean step boundary."""

    def __init__(self) -> None:
        self.stop = False
        self._old = None

    def __enter__(self) -> _StopFlag:
        if threading_main():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_: Any) -> None:
        if self.stop:  # second Ctrl-C: leave at once
            raise KeyboardInterrupt
        self.stop = True
        log.warning("interrupt: saving a checkpoint at the end of this step (Ctrl-C again to quit now)")

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class TrainingInterrupted(CaptionsError):
    """Raised after the checkpoint of an interrupted run is saved."""


def evaluate_split(model, ds: PreparedDataset, store: FeatureStore, split: str, cfg: TrainConfig,
                   device: torch.device, image_ids: np.ndarray, rows: np.ndarray) -> dict[str, float]:
    """Teacher-forced loss on ``rows`` and greedy BLEU-4 / CIDEr on ``image_ids`` of ``split``."""
    model.eval()
    total, count = 0.0, 0
    preds: dict[int, str] = {}
    with torch.no_grad():
        for i in range(0, len(rows), cfg.eval_batch_size):
            r = rows[i : i + cfg.eval_batch_size]
            caps = caption_tokens(ds, r)
            feats = store.gather_sorted(ds.image_ids[r])
            logits, _ = model(feats, caps[:, :-1].to(device))
            total += float(caption_loss(logits, caps[:, 1:].to(device), cfg.loss)) * len(r)
            count += len(r)
        for i in range(0, len(image_ids), cfg.eval_batch_size):
            ids = image_ids[i : i + cfg.eval_batch_size]
            tokens, _, _ = greedy_decode(model, store.gather_sorted(ids), ds.max_words + 1)
            for img, text in zip(ids.tolist(), decode_captions(tokens.cpu(), ds.vocab), strict=True):
                preds[img] = text
    refs = ds.references(split)
    scores = score_captions(refs, preds, metrics=("bleu", "cider"))
    model.train()
    return {"val_loss": total / max(count, 1), "BLEU-4": scores.get("BLEU-4", 0.0),
            "CIDEr": scores.get("CIDEr", 0.0), "samples": [preds[i] for i in list(preds)[:3]]}


def caption_tokens(ds: PreparedDataset, rows: np.ndarray) -> torch.Tensor:
    """Token ids of caption ``rows`` (N,) as a long tensor (N, T'), without the all-``<NULL>``
    tail columns."""
    caps = torch.from_numpy(ds.captions[rows]).long()
    longest = int((caps != NULL_ID).sum(dim=1).max())
    return caps[:, :longest]


def train(data_dir: str | os.PathLike, features: str | os.PathLike, out_dir: str | os.PathLike,
          cfg: TrainConfig | None = None, resume: bool = False, progress: bool = True,
          step_callback: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train ``cfg.model`` on the train split, evaluating on val after each epoch.

    Writes ``out_dir/last.pt`` (every ``checkpoint_every`` steps and each epoch), ``best.pt``
    (best val CIDEr) and ``metrics.jsonl``. ``resume`` continues from ``last.pt`` exactly where
    it stopped. Returns {"best": {...}, "epochs_run": n, "out": path}.
    Under torchrun (WORLD_SIZE > 1) it joins the process group, creating it if none exists yet;
    one it created is destroyed when training finishes.
    """
    from tqdm import tqdm

    cfg = cfg or TrainConfig()
    if cfg.scst_start not in ("cider", "loss"):
        raise CaptionsError(f"unknown scst_start '{cfg.scst_start}' (cider or loss)")
    out = Path(out_dir)
    ds = load_prepared(data_dir)
    cache = FeatureCache(features)
    cache.check_dataset(ds.dataset_hash, what=str(data_dir))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    ckpt = None
    last = out / "last.pt"
    if resume:
        if last.exists():
            ckpt = load_checkpoint(last)
            if ckpt["vocab"]["hash"] != ds.vocab.hash:
                raise CaptionsError(f"checkpoint vocabulary (hash {ckpt['vocab']['hash'][:12]}) differs from the "
                                    f"dataset's ({ds.vocab.hash[:12]}): it was trained on another prepared dataset",
                                    last)
            if ckpt["dataset_hash"] != ds.dataset_hash:
                raise CaptionsError("checkpoint was trained on another prepared dataset (dataset_hash differs)", last)
            if ckpt.get("early_stopped"):  # before any features are loaded: there is nothing to do
                log.info("%s stopped early at epoch %d (val CIDEr had not improved for %d epochs): nothing to "
                         "resume", last, ckpt["epoch"], ckpt["bad_epochs"])
                cache.close()
                return {"best": ckpt["best"], "epochs_run": ckpt["epoch"], "out": str(out)}
            # settings a run from an older version lacks take the behaviour it was started with
            old = TrainConfig.from_dict({"scst_epochs": 0, "scst_start": "cider", **ckpt["train_config"]})
            cfg = TrainConfig.from_dict({**asdict(old), "epochs": cfg.epochs, "device": cfg.device})
        else:
            log.info("nothing to resume in %s; starting a new run", out)
    elif last.exists():
        raise CaptionsError("already holds a training run; pass --resume to continue it, or choose another --out",
                            out)

    device = resolve_device(cfg.device)
    owns_group = world > 1 and not torch.distributed.is_initialized()
    if owns_group:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    torch.set_flush_denormal(True)  # tiny sigmoid/tanh gradients otherwise hit the slow denormal path on CPU

    valid = cache.valid
    train_rows = ds.split_caption_rows("train")
    dropped = int((~valid[ds.image_ids[train_rows]]).sum())
    if dropped:
        log.warning("%d train captions belong to images without features (unreadable at extraction); left out",
                    dropped)
    train_rows = train_rows[valid[ds.image_ids[train_rows]]]
    if len(train_rows) == 0:
        raise CaptionsError("no training captions with features", data_dir)
    val_ids = np.array([i for i in ds.split_image_ids("val") if valid[i]], dtype=np.int64)
    val_rows = ds.split_caption_rows("val")
    val_rows = val_rows[valid[ds.image_ids[val_rows]]]
    if len(val_ids) == 0:
        log.warning("no val split: no evaluation, no early stopping, best.pt = last epoch")

    dcfg = DecoderConfig(vocab_size=len(ds.vocab), feature_dim=cache.channels, embed_dim=cfg.embed_dim,
                         hidden_dim=cfg.hidden_dim, dropout=cfg.dropout, embed_dropout=cfg.embed_dropout,
                         attention=cfg.attention,
                         attention_dim=cfg.attention_dim, feature_as_input=cfg.feature_as_input)
    try:
        core = build_decoder(cfg.model, dcfg).to(device)
    except ValueError as e:
        raise CaptionsError(str(e)) from None
    store = FeatureStore(cache, core.uses_spatial, int(cfg.ram_budget_gb * 2**30), device)
    optimizer = torch.optim.Adam(core.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # the averaged weights are what is evaluated and shipped (state_dict); the raw ones resume training
    ema = torch.optim.swa_utils.AveragedModel(core, avg_fn=ema_update(cfg.ema)) if cfg.ema > 0 else None
    shipped = ema.module if ema is not None else core
    # batches hold whole images, so their number varies a little from epoch to epoch: the schedule
    # counts on the first epoch's
    total_steps = len(epoch_batches(train_rows, ds.image_ids, cfg.batch_size, cfg.seed, 0,
                                    store.block_images)) // world * cfg.epochs
    scst_from: list[int | None] = [None]  # the global step where self-critical training began

    def lr_lambda(step: int) -> float:
        if scst_from[0] is not None and step >= scst_from[0]:
            return cfg.scst_lr / cfg.lr
        return lr_factor(cfg.schedule, step, total_steps)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    cider = None  # the CIDEr-D rewards of self-critical training, built when it starts

    start_epoch, start_step, best, bad_epochs = 0, 0, {"CIDEr": -1.0, "epoch": -1}, 0
    lowest = (-1, math.inf)  # the cross-entropy epoch of the lowest val loss, and that loss
    if ckpt is not None:
        core.load_state_dict(ckpt.get("train_state_dict", ckpt["state_dict"]))
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, start_step = ckpt["epoch"], ckpt["step_in_epoch"]
        best, bad_epochs = ckpt["best"], ckpt["bad_epochs"]
        lowest = tuple(ckpt.get("lowest_val_loss", lowest))
        scst_from[0] = ckpt.get("scst_from")
        set_rng_state(ckpt["rng"])
        if ema is not None:
            ema.module.load_state_dict(ckpt["state_dict"])
            ema.n_averaged.fill_(int(ckpt.get("ema_n_averaged", 1)))
        log.info("resuming %s at epoch %d, step %d", last, start_epoch + 1, start_step)
    model = core
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    amp_dtype = train_precision(cfg.precision, device)
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    log.info("training on %s in %s", device, "fp32" if amp_dtype is None else str(amp_dtype).removeprefix("torch."))
    out.mkdir(parents=True, exist_ok=True)
    writer = tensorboard_writer(out) if rank == 0 else None

    def checkpoint(epoch: int, step_in_epoch: int) -> dict[str, Any]:
        return {"model": cfg.model, "decoder_config": asdict(dcfg), "train_config": asdict(cfg),
                "state_dict": shipped.state_dict(), "vocab": {"idx_to_token": ds.vocab.idx_to_token,
                                                           "hash": ds.vocab.hash},
                "dataset_hash": ds.dataset_hash, "max_length": ds.max_words,
                "features": feature_meta(cache.metadata), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
                "global_step": int(scheduler.last_epoch), "rng": rng_state(), "best": dict(best),
                "bad_epochs": bad_epochs, "lowest_val_loss": list(lowest), "scst_from": scst_from[0],
                **({"train_state_dict": core.state_dict(), "ema_n_averaged": int(ema.n_averaged)}
                   if ema is not None else {})}

    def start_self_critical() -> None:
        """Continue from the cross-entropy epoch of the best val CIDEr (``scst_start="cider"``) or
        of the lowest val loss (``"loss"``), with fresh Adam moments (the policy gradient has
        another scale) and the constant self-critical learning rate."""
        source = out / ("best.pt" if cfg.scst_start == "cider" else SCST_START)
        if source.exists():
            weights = load_checkpoint(source)["state_dict"]
            core.load_state_dict(weights)
            if ema is not None:
                ema.module.load_state_dict(weights)
        optimizer.state.clear()
        scst_from[0] = int(scheduler.last_epoch)
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * lr_lambda(scst_from[0])
        if not len(val_ids):  # nothing to choose by: best.pt, when it is read, holds the last epoch
            start = "the last cross-entropy epoch (no val split)"
        elif cfg.scst_start == "cider":
            start = f"the best epoch ({best['epoch']}, val CIDEr {best['CIDEr']:.4f})"
        else:
            start = f"the epoch of the lowest val loss ({lowest[0]}, {lowest[1]:.4f})"
        log.info("self-critical training from %s, lr %g", start, cfg.scst_lr)

    total_epochs = cfg.epochs + cfg.scst_epochs
    epoch, epochs_run = start_epoch, start_epoch
    model.train()
    with _StopFlag() as flag, retained_heap() if device.type == "cpu" else nullcontext():
        while epoch < total_epochs:
            scst = epoch >= cfg.epochs
            skip = start_step if epoch == start_epoch else 0
            if scst and scst_from[0] is None:
                start_self_critical()
            if scst and cider is None:
                cider = train_references(ds, np.unique(ds.image_ids[train_rows]))
            batches = epoch_batches(train_rows, ds.image_ids, cfg.batch_size, cfg.seed, epoch, store.block_images)
            if world > 1:  # every rank takes the same number of steps
                batches = batches[: len(batches) // world * world][rank::world]
            bar = tqdm(total=len(batches), initial=skip, unit="batch", disable=not progress or rank != 0,
                       desc=f"epoch {epoch + 1}/{total_epochs}{' self-critical' if scst else ''}")
            t0, seen, running, rewards = time.perf_counter(), 0, None, []
            for k in range(skip, len(batches)):
                rows = batches[k]
                if store.block_images is not None and k + 1 < len(batches):
                    store.prefetch(int(ds.image_ids[batches[k + 1][0]]) // store.block_images)
                images, image_index = images_of_batch(ds.image_ids[rows])
                feats = store.gather(images)
                if scst:
                    with amp:
                        loss, reward = self_critical_loss(core, feats, images, cider, ds.vocab.idx_to_token,
                                                          cfg.scst_samples, ds.max_words + 1)
                    rewards.append(reward)
                    seen += len(images) * cfg.scst_samples
                else:
                    caps = caption_tokens(ds, rows).to(device)
                    with amp:
                        logits, alphas = model(feats, caps[:, :-1],
                                               image_index=torch.from_numpy(image_index).to(device))
                    loss = caption_loss(logits, caps[:, 1:], cfg.loss, cfg.label_smoothing)
                    if alphas is not None and cfg.attention == "additive" and cfg.ds_lambda > 0:
                        loss = loss + cfg.ds_lambda * doubly_stochastic_penalty(alphas.float(), caps[:, 1:])
                    seen += len(rows)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if scst and world > 1:  # sampling runs the module itself, so DDP does not reduce these
                    for p in core.parameters():
                        if p.grad is not None:
                            torch.distributed.all_reduce(p.grad)
                            p.grad /= world
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.grad_clip)
                optimizer.step()
                if ema is not None:
                    ema.update_parameters(core)
                scheduler.step()
                value = loss.item()
                running = value if running is None else 0.98 * running + 0.02 * value
                bar.update(1)
                bar.set_postfix(loss=f"{running:.3f}", caps_s=f"{seen * world / (time.perf_counter() - t0):.0f}",
                                **({"reward": f"{np.mean(rewards[-20:]):.3f}"} if scst else {}))
                if step_callback is not None:
                    step_callback(int(scheduler.last_epoch))
                if flag.stop or (cfg.checkpoint_every and (k + 1) % cfg.checkpoint_every == 0):
                    if rank == 0:
                        save_checkpoint(last, checkpoint(epoch, k + 1))
                    if flag.stop:
                        bar.close()
                        raise TrainingInterrupted(f"interrupted at epoch {epoch + 1}, step {k + 1}; saved {last}; "
                                                  f"continue with --resume")
            bar.close()
            epochs_run = epoch + 1
            elapsed = time.perf_counter() - t0
            next_epoch, stop = epoch + 1, False
            if rank == 0:
                row: dict[str, Any] = {"epoch": epoch + 1, "phase": "self-critical" if scst else "cross-entropy",
                                       "train_loss": running, "lr": scheduler.get_last_lr()[0],
                                       "captions_per_s": seen * world / max(elapsed, 1e-9), "time_s": elapsed}
                if scst:
                    row["train_reward"] = float(np.mean(rewards)) if rewards else None
                if len(val_ids):
                    row.update(evaluate_split(shipped, ds, store, "val", cfg, device, val_ids, val_rows))
                improved = not len(val_ids) or row["CIDEr"] > best["CIDEr"]
                if improved:
                    best = {k: row[k] for k in ("epoch", "val_loss", "BLEU-4", "CIDEr") if k in row}
                    bad_epochs = 0
                else:
                    bad_epochs += 1
                stop = len(val_ids) > 0 and bad_epochs >= cfg.patience
                if not scst and (stop or next_epoch == cfg.epochs) and cfg.scst_epochs > 0:
                    next_epoch, stop, bad_epochs = cfg.epochs, False, 0  # on to self-critical training
                lower = not scst and len(val_ids) > 0 and row["val_loss"] < lowest[1]
                if lower:
                    lowest = (epoch + 1, row["val_loss"])
                ck = {**checkpoint(next_epoch, 0), "early_stopped": stop}
                save_checkpoint(last, ck)
                if improved:
                    save_checkpoint(out / "best.pt", ck)
                if lower and cfg.scst_epochs > 0 and cfg.scst_start == "loss":
                    save_checkpoint(out / SCST_START, ck)
                samples = row.pop("samples", [])
                with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                if writer is not None:
                    for key, v in row.items():
                        if key != "epoch" and isinstance(v, float):
                            writer.add_scalar(key, v, epoch + 1)
                log.info("epoch %d: %s", epoch + 1, ", ".join(
                    f"{k} {v:.4g}" for k, v in row.items() if k != "epoch" and isinstance(v, float)))
                for s in samples:
                    log.info("  val sample: %s", s)
                if stop:
                    log.info("early stop: val CIDEr has not improved for %d epochs (best %.4f at epoch %d)",
                             bad_epochs, best["CIDEr"], best["epoch"])
            if world > 1:
                flag_list = [stop, next_epoch]
                torch.distributed.broadcast_object_list(flag_list, src=0)
                stop, next_epoch = flag_list
            if stop:
                break
            epoch = next_epoch
    if writer is not None:
        writer.close()
    cache.close()
    if owns_group:
        # left to interpreter exit, gloo's worker threads can abort the process (SIGABRT, "terminate
        # called without an active exception", pytorch#190489) after a finished run; only on success,
        # since destroying while another rank is still in a collective would hang
        torch.distributed.destroy_process_group()
    return {"best": best, "epochs_run": epochs_run, "out": str(out)}


def tensorboard_writer(out: Path):
    """A TensorBoard SummaryWriter in ``out/tb`` when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tb"))
