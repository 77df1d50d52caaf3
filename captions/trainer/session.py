"""``TrainingRun``: everything one training run holds (data, features, decoder, optimizer, EMA,
schedule, state, process group) and how it becomes a checkpoint and comes back from one."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Collection
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from captions.distributed import Distributed, barrier, join, launch_rank
from captions.errors import CaptionsError, error_text
from captions.features.cache import FeatureCache
from captions.features.spec import FeatureSpec
from captions.fsutil import atomic_path
from captions.models.checkpoint import build_decoder, load_checkpoint, save_checkpoint
from captions.models.registry import decoder_config, decoder_entry, stored_decoder_config
from captions.options import as_option, option_fields
from captions.pipeline.prepared import PreparedDataset, load_prepared
from captions.trainer.commit import repair
from captions.trainer.config import TrainConfig
from captions.trainer.control import (
    TrainingInterrupted,
    ema_update,
    immediate_interrupt,
    rng_state,
    set_rng_state,
    train_precision,
)
from captions.trainer.data import FeatureStore, epoch_batches
from captions.trainer.phases import CrossEntropy, FineTune, SelfCritical
from captions.trainer.state import TrainState

if TYPE_CHECKING:  # backbone code is imported only by runs that fine-tune (tests/test_layering.py)
    from captions.trainer.encoder import TunedEncoder

log = logging.getLogger("captions")


# settings a resumed run may change (logged); the others would make it another run
CHANGEABLE_ON_RESUME = ("epochs", "scst_epochs", "scst_lr", "scst_samples", "patience", "device", "precision",
                        "ram_budget_gb", "checkpoint_every", "eval_batch_size", "fine_tune_workers")


def _weights_tag(state: dict[str, torch.Tensor]) -> str:
    """The tuned weights' short tag in ``encoder-<tag>.pt`` / ``features-<tag>.h5``: 16 hex digits
    of their ``weights_identity``."""
    from captions.features.tuning import weights_identity

    return weights_identity(state).split(":")[1][:16]


def _holds_weights(path: Path, tag: str) -> bool:
    """Whether ``path`` is a readable state_dict file of the tuned weights tagged ``tag`` (a file
    damaged since it was written is written again from the checkpoint's weights)."""
    try:
        return _weights_tag(torch.load(path, map_location="cpu", weights_only=True)) == tag
    except Exception:  # missing, truncated, not a state_dict: all mean "write it"
        return False


def _setting(cfg: TrainConfig, name: str) -> Any:
    if name == "model":
        return cfg.model
    return getattr(cfg, name) if name in cfg.__dataclass_fields__ else cfg.decoder_settings().get(name)


def _as_given(name: str, value: Any) -> str:
    return f"model {value}" if name == "model" else as_option(name, value)


def resumed_config(stored: TrainConfig, cfg: TrainConfig, given: Collection[str] | None, last: Path) -> TrainConfig:
    """The config a resumed run continues with: the stored one, with the ``given`` settings of
    ``cfg`` (all of them when None) that may change on resume (``CHANGEABLE_ON_RESUME``), each
    change logged. Raises ``CaptionsError`` naming the given settings that differ and may not."""
    names = set(given) if given is not None else (
        {"model", *stored.__dataclass_fields__, *cfg.decoder_settings()} - {"decoder"})
    changed = sorted(n for n in names if _setting(cfg, n) != _setting(stored, n))
    fixed = [n for n in changed if n not in CHANGEABLE_ON_RESUME]
    if fixed:
        what = "; ".join(f"{_as_given(n, _setting(stored, n))} (asked {_as_given(n, _setting(cfg, n))})"
                         for n in fixed)
        raise CaptionsError(f"--resume continues the stored run, whose settings these would change: {what}; "
                            f"start a new run in another --out instead", last)
    out = TrainConfig.from_dict({**asdict(stored), **{n: getattr(cfg, n) for n in changed}})
    for n in changed:
        log.info("resume: %s %r -> %r", n, _setting(stored, n), _setting(cfg, n))
    return out


def _refuse_orphaned_checkpoints(out: Path) -> None:
    """Only an epoch's commit (``last.pt``) moves best.pt / scst_start.pt into place, so finding one
    without ``last.pt`` means a finished run lost its last.pt: starting afresh would overwrite it."""
    orphans = [name for name in ("best.pt", "scst_start.pt") if (out / name).exists()]
    if orphans:
        raise CaptionsError(f"holds {' and '.join(orphans)} of a run but no last.pt, so it cannot be resumed and "
                            "starting a new run would overwrite them; move them away or choose another --out", out)


def resume_point(out: Path, ds: PreparedDataset, cache: FeatureCache, cfg: TrainConfig, resume: bool,
                 given: Collection[str] | None = None) -> tuple[dict[str, Any] | None, TrainConfig]:
    """The checkpoint to continue from (None: a new run) and the config to run with (on resume,
    ``resumed_config``). On rank 0 it first brings ``out`` back to its last committed epoch
    (``captions.trainer.commit.repair``). Raises ``CaptionsError`` when ``out`` holds a run and
    ``resume`` is off, or the run was trained on another dataset or other features, or a setting
    may not change."""
    last, main = out / "last.pt", launch_rank() == 0
    if not resume:
        if last.exists():
            raise CaptionsError("already holds a training run; pass --resume to continue it, or choose another "
                                "--out", out)
        _refuse_orphaned_checkpoints(out)
        if main:
            repair(out, None)
        return None, cfg
    if not last.exists():
        _refuse_orphaned_checkpoints(out)
        log.info("nothing to resume in %s; starting a new run", out)
        if main:
            repair(out, None)
        return None, cfg
    ckpt = load_checkpoint(last)
    if main:  # before anything reads best.pt, scst_start.pt or metrics.jsonl
        repair(out, ckpt)
    if ckpt["vocab"]["hash"] != ds.vocab.hash:
        raise CaptionsError(f"checkpoint vocabulary (hash {ckpt['vocab']['hash'][:12]}) differs from the "
                            f"dataset's ({ds.vocab.hash[:12]}): it was trained on another prepared dataset", last)
    if ckpt["dataset_hash"] != ds.dataset_hash:
        raise CaptionsError("checkpoint was trained on another prepared dataset (dataset_hash differs)", last)
    base_features(ckpt, last).require_compatible(
        cache.spec, FeatureSpec.DECODER_KEYS, what=f"the run was trained on other features than {cache.path}",
        path=last)
    # settings a run from an older version lacks take the behaviour it was started with
    stored = TrainConfig.from_dict({"scst_epochs": 0, "scst_start": "cider", **ckpt["train_config"]})
    if stored.model == ckpt.get("model") and ckpt.get("decoder_config"):
        stored.decoder = built_decoder_settings(ckpt)
    resumed = resumed_config(stored, cfg, given, last)
    if resumed.epochs != stored.epochs:
        if ckpt.get("scst_from") is not None:
            raise CaptionsError(f"--epochs cannot change once self-critical training has begun (the "
                                f"cross-entropy phase had {stored.epochs}); more epochs come with --scst-epochs", last)
        if resumed.epochs < ckpt["epoch"]:
            raise CaptionsError(f"--epochs {resumed.epochs} is fewer than the {ckpt['epoch']} epochs already run", last)
    return ckpt, resumed


def built_decoder_settings(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The decoder settings a checkpoint's model was built with: its ``decoder_config`` over the
    settings its run was given (older checkpoints kept some only there), and for settings added
    since, the behaviour it was trained with (``stored_decoder_config``), not today's defaults."""
    model = ckpt["model"]
    given = TrainConfig.from_dict(ckpt.get("train_config") or {"model": model}).decoder
    built = asdict(stored_decoder_config(model, {**given, **(ckpt.get("decoder_config") or {})}))
    return {f.name: built[f.name] for f in option_fields(decoder_entry(model).config)}


def base_features(ckpt: dict[str, Any], path: Path) -> FeatureSpec:
    """The spec of the cache a run was started on: a fine-tuned run's checkpoint records its
    tuned features under ``features`` and the cache's under ``encoder.base_features``."""
    enc = ckpt.get("encoder")
    return FeatureSpec.from_dict(enc["base_features"] if enc else ckpt["features"], path=path)


class TrainingRun:
    """One run's objects. Built by ``TrainingRun.open``; ``checkpoint()`` is its whole state."""

    def __init__(self, out: Path, ds: PreparedDataset, cache: FeatureCache, cfg: TrainConfig) -> None:
        self.out, self.ds, self.cache, self.cfg = out, ds, cache, cfg
        self.state = TrainState()
        self.dist: Distributed = join(cfg.device)
        self.device = self.dist.device
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        torch.set_flush_denormal(True)  # tiny sigmoid/tanh gradients otherwise hit the slow denormal path on CPU
        self._select_rows()
        self.dcfg = decoder_config(cfg.model, cfg.decoder, vocab_size=len(ds.vocab), feature_dim=cache.channels)
        self.core = build_decoder(cfg.model, self.dcfg).to(self.device)
        self.store = FeatureStore(cache, self.core.uses_spatial, int(cfg.ram_budget_gb * 2**30), self.device)
        self.optimizer = torch.optim.Adam(self.core.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # the averaged weights are what is evaluated and shipped (state_dict); the raw ones resume training
        self.ema = (torch.optim.swa_utils.AveragedModel(self.core, avg_fn=ema_update(cfg.ema))
                    if cfg.ema > 0 else None)
        self.shipped = self.ema.module if self.ema is not None else self.core
        # batches hold whole images, so their number varies a little from epoch to epoch: the schedule
        # counts on the first epoch's
        self.total_steps = len(self.epoch_batches(0, split=False)) // self.dist.world * cfg.epochs
        self.warmup_steps = self._warmup(self.core.warmup_steps)
        self.base_spec, self.tuned_cache = cache.spec, False
        self.image_paths = ds.image_paths()
        self.fine_tune_steps = self.total_steps // max(cfg.epochs, 1) * cfg.fine_tune_epochs
        self.encoder: TunedEncoder | None = None
        if cfg.fine_tune_encoder:
            from captions.trainer.encoder import TunedEncoder

            self.encoder = TunedEncoder(cache.spec, self.device, cfg.fine_tune_from_block, cfg.encoder_lr,
                                        self.fine_tune_steps, weights=cfg.encoder_weights or None)
        self.phases = {"cross-entropy": CrossEntropy(self), "fine-tune": FineTune(self),
                       "self-critical": SelfCritical(self)}
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_lambda)
        self.model: torch.nn.Module = self.core
        self._amp_dtype = train_precision(cfg.precision, self.device)
        self.epochs_run = 0

    @classmethod
    def open(cls, data_dir: str | os.PathLike, features: str | os.PathLike, out_dir: str | os.PathLike,
             cfg: TrainConfig, resume: bool, given: Collection[str] | None = None
             ) -> tuple[TrainingRun | None, dict[str, Any]]:
        """(the run, None) to train, or (None, the result) when a resumed run had already stopped early.
        ``given``: the settings of ``cfg`` the user gave (see ``resumed_config``)."""
        cfg.validate()
        out, ds = Path(out_dir), load_prepared(data_dir)
        cache = FeatureCache(features)
        cache.check_dataset(ds.dataset_hash, what=str(data_dir))
        try:
            ckpt, cfg = resume_point(out, ds, cache, cfg, resume, given)
        except BaseException:
            cache.close()
            raise
        if ckpt is not None and ckpt.get("early_stopped"):  # before any features are loaded: nothing to do
            log.info("%s stopped early at epoch %d (its val metric had not improved for %d epochs): nothing to resume; "
                     "settings changed on --resume do not reopen it (to train on from its best weights, start a new "
                     "run: --config %s --init-from %s --out NEW_DIR, plus the settings to change)", out / "last.pt",
                     ckpt["epoch"], ckpt["bad_epochs"], out / "config.json", out / "best.pt")
            cache.close()
            return None, {"best": ckpt["best"], "epochs_run": ckpt["epoch"], "out": str(out), "stopped_before": True}
        run = cls(out, ds, cache, cfg)
        if ckpt is not None:
            run.restore(ckpt)
        elif cfg.init_from:
            run.init_from(Path(cfg.init_from))
        run.wrap_for_ddp()
        log.info("training on %s in %s", run.device,
                 "fp32" if run._amp_dtype is None else str(run._amp_dtype).removeprefix("torch."))
        return run, {}

    def _select_rows(self) -> None:
        """Train caption rows, val image ids and val caption rows that have features."""
        ds, valid = self.ds, self.cache.valid
        rows = ds.split_caption_rows("train")
        dropped = int((~valid[ds.image_ids[rows]]).sum())
        if dropped:
            log.warning("%d train captions belong to images without features (unreadable at extraction); left out",
                        dropped)
        self.train_rows = rows[valid[ds.image_ids[rows]]]
        if len(self.train_rows) == 0:
            raise CaptionsError("no training captions with features", ds.root)
        self.val_ids = np.array([i for i in ds.split_image_ids("val") if valid[i]], dtype=np.int64)
        val_rows = ds.split_caption_rows("val")
        self.val_rows = val_rows[valid[ds.image_ids[val_rows]]]
        if len(self.val_ids) == 0:
            log.warning("no val split: no evaluation, no early stopping, best.pt = last epoch")

    def _warmup(self, asked: int) -> int:
        """The decoder's learning-rate warm-up, at most a quarter of the cross-entropy steps: a longer
        one would keep the learning rate near zero for the whole run (said once in the log)."""
        most = max(1, self.total_steps // 4)
        if asked > most:
            log.warning("warm-up of %d steps is longer than a quarter of the %d cross-entropy steps; using %d",
                        asked, self.total_steps, most)
            return most
        return asked

    @property
    def total_epochs(self) -> int:
        return self.cfg.epochs + self.cfg.fine_tune_epochs + self.cfg.scst_epochs

    def epoch_batches(self, epoch: int, split: bool = True) -> list[np.ndarray]:
        """The caption-row batches of ``epoch``; under DDP (``split``) this rank's share, every rank
        taking the same number of steps."""
        batches = epoch_batches(self.train_rows, self.ds.image_ids, self.cfg.batch_size, self.cfg.seed, epoch,
                                self.store.block_images)
        world, rank = self.dist.world, self.dist.rank
        if split and world > 1:
            batches = batches[: len(batches) // world * world][rank::world]
        return batches

    def phase(self) -> CrossEntropy | FineTune | SelfCritical:
        """The phase of the current epoch."""
        return self.phases[self.state.phase(self.cfg.epochs, self.cfg.fine_tune_epochs)]

    def lr_lambda(self, step: int) -> float:
        """The learning-rate factor at global ``step``: each later phase's from the step it began."""
        if self.state.scst_from is not None and step >= self.state.scst_from:
            return self.phases["self-critical"].lr_factor(step)
        if self.state.ft_from is not None and step >= self.state.ft_from:
            return self.phases["fine-tune"].lr_factor(step)
        return self.phases["cross-entropy"].lr_factor(step)

    def autocast(self) -> AbstractContextManager:
        """The decoder's autocast (``--precision``), or nothing for fp32."""
        if self._amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self._amp_dtype)

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Set the decoder's weights (and the EMA's) to ``state_dict``."""
        self.core.load_state_dict(state_dict)
        if self.ema is not None:
            self.ema.module.load_state_dict(state_dict)

    def wrap_for_ddp(self) -> None:
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.core, device_ids=ids)

    def checkpoint(self) -> dict[str, Any]:
        """The run's whole state as a checkpoint dict (``captions.models.checkpoint``'s schema).

        Once the fine-tune phase has begun it also holds ``encoder`` (``TunedEncoder.state_dict``
        plus ``base_features``, the spec of the cache the run started on), and ``features`` says
        the features come from those weights: the re-extracted cache's spec, or before it exists
        the cache's spec with ``weights`` = the tuned weights' ``finetuned:<sha256>`` identity."""
        ds, ema = self.ds, self.ema
        features, extra = self.cache.spec.to_dict(), {}
        if self.encoder is not None and self.state.ft_from is not None:
            enc = self.encoder.state_dict()
            extra["encoder"] = {**enc, "base_features": self.base_spec.to_dict()}
            if not self.tuned_cache:
                features = replace(self.cache.spec, weights=enc["identity"]).to_dict()
        return {"model": self.cfg.model, "decoder_config": asdict(self.dcfg), "train_config": asdict(self.cfg),
                "state_dict": self.shipped.state_dict(), **extra,
                "vocab": {"idx_to_token": ds.vocab.idx_to_token, "hash": ds.vocab.hash},
                "dataset_hash": ds.dataset_hash, "max_length": ds.max_words, "features": features,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                **self.state.state_dict(), "global_step": int(self.scheduler.last_epoch), "rng": rng_state(),
                **({"train_state_dict": self.core.state_dict(), "ema_n_averaged": int(ema.n_averaged)}
                   if ema is not None else {})}

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Continue exactly where checkpoint ``ckpt`` stopped."""
        self.core.load_state_dict(ckpt.get("train_state_dict", ckpt["state_dict"]))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.state.load_state_dict(ckpt)
        self.epochs_run = self.state.epoch
        if ckpt.get("encoder") is not None and self.encoder is not None:
            self.encoder.load_state_dict(ckpt["encoder"])
        set_rng_state(ckpt["rng"])
        if self.ema is not None:
            self.ema.module.load_state_dict(ckpt["state_dict"])
            self.ema.n_averaged.fill_(int(ckpt.get("ema_n_averaged", 1)))
        log.info("resuming %s at epoch %d, step %d", self.out / "last.pt", self.state.epoch + 1,
                 self.state.step_in_epoch)

    def init_from(self, path: Path) -> None:
        """Start a new run from checkpoint ``path``'s decoder (and fine-tuned encoder) weights, its
        cross-entropy epochs counted as done. Raises ``CaptionsError`` naming the checkpoint when it
        was trained on another dataset or other features, or its decoder does not fit the settings."""
        ckpt = load_checkpoint(path)
        if ckpt["vocab"]["hash"] != self.ds.vocab.hash or ckpt["dataset_hash"] != self.ds.dataset_hash:
            raise CaptionsError("--init-from: trained on another prepared dataset (vocabulary or dataset hash "
                                "differs)", path)
        base_features(ckpt, path).require_compatible(
            self.base_spec, FeatureSpec.DECODER_KEYS, path=path,
            what=f"--init-from: trained on other features than {self.cache.path}")
        if ckpt.get("encoder") is not None and self.encoder is None:
            raise CaptionsError("--init-from: its encoder was fine-tuned; continue it with --fine-tune-encoder", path)
        if ckpt.get("model") != self.cfg.model:
            raise CaptionsError(f"--init-from: its decoder is {ckpt.get('model')}, this run trains {self.cfg.model}",
                                path)
        given = self.cfg.decoder_settings()
        stored = built_decoder_settings(ckpt)
        differ = sorted(k for k, v in stored.items() if k in given and given[k] != v)
        if differ:
            raise CaptionsError("--init-from: its decoder settings differ: " + ", ".join(
                f"{as_option(k, stored[k])} (here {as_option(k, given[k])})" for k in differ), path)
        try:
            self.load_weights(ckpt["state_dict"])
        except RuntimeError as e:
            raise CaptionsError(f"--init-from: its {ckpt['model']} decoder does not fit these decoder settings "
                                f"({error_text(e)}); give the settings it was trained with", path) from None
        if ckpt.get("encoder") is not None:
            self.encoder.model.load_state_dict(ckpt["encoder"]["state_dict"])
        self.state.epoch = self.cfg.epochs
        log.info("starting from the weights of %s (epoch %s); the cross-entropy epochs count as done", path,
                 ckpt.get("epoch"))

    def use_tuned_features(self) -> None:
        """After the fine-tune phase: extract every image's features with the tuned encoder into
        ``out/features-<tag>.h5`` (``extract_features``: whole or nothing, resumable; the weights
        file ``out/encoder-<tag>.pt`` it reads is kept) and train on them from now on."""
        if self.tuned_cache:
            return
        from captions.features.extract import ExtractOptions, extract_features

        weights = self.encoder.weights()
        tag = _weights_tag(weights)
        wfile, cpath = self.out / f"encoder-{tag}.pt", self.out / f"features-{tag}.h5"
        if self.dist.is_main and not _holds_weights(wfile, tag):
            with atomic_path(wfile) as tmp:
                torch.save(weights, tmp)
        barrier(self.dist)
        spec = self.base_spec
        log.info("extracting features with the fine-tuned encoder into %s", cpath)
        try:
            with immediate_interrupt():
                extract_features(self.ds.root, cpath, ExtractOptions(
                    backbone=spec.backbone, weights=str(wfile), image_size=spec.image_size, dtype=spec.dtype,
                    precision=spec.precision, device=self.cfg.device), progress=False)
        except KeyboardInterrupt:
            raise TrainingInterrupted(f"interrupted while extracting features with the fine-tuned encoder into "
                                      f"{cpath.name}; --resume continues the extraction") from None
        cache = FeatureCache(cpath)
        cache.check_dataset(self.ds.dataset_hash, what=str(self.ds.root))
        self.cache.close()
        self.cache, self.tuned_cache = cache, True
        self.store = FeatureStore(cache, self.core.uses_spatial, int(self.cfg.ram_budget_gb * 2**30), self.device)

    def save(self, name: str, ckpt: dict[str, Any] | None = None) -> None:
        save_checkpoint(self.out / name, ckpt if ckpt is not None else self.checkpoint())

    def result(self) -> dict[str, Any]:
        return {"best": self.state.best, "epochs_run": self.epochs_run, "out": str(self.out)}
