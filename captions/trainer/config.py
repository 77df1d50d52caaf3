"""``TrainConfig``: every setting of ``captions train``, its default and its help text.

Written once: ``captions train``'s options are generated from these fields (``captions.options``)
and the decoder's own settings from its config dataclass in ``captions.models.registry``. Kept free
of torch so that ``--help`` does not import it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from captions.errors import CaptionsError
from captions.models.registry import DECODERS, decoder_config, decoder_entry
from captions.options import flag, option_fields, setting, validate

# settings of the fine-tune phase: refused without --fine-tune-encoder rather than ignored
FINE_TUNE_SETTINGS = ("encoder_lr", "fine_tune_from_block", "encoder_epochs", "augment", "fine_tune_decoder_lr",
                      "fine_tune_workers", "encoder_weights")


@dataclass
class TrainConfig:
    """Everything ``captions train`` can be told; stored in every checkpoint.

    ``model`` is a registered decoder name; ``decoder`` holds its settings (fields of its config
    dataclass, e.g. ``{"attention": "additive"}``); those left out take the decoder's defaults.
    ``from_dict`` also takes the decoder's settings at the top level (as older checkpoints and
    config files write them).
    """

    model: str = "attn"
    decoder: dict[str, Any] = field(default_factory=dict)
    epochs: int = setting(20, "Cross-entropy epochs (the cosine schedule spans them).", min=1)
    batch_size: int = setting(128, "Most captions per batch; a batch holds whole images (all their captions).",
                              min=1)
    lr: float = setting(1e-3, "Adam learning rate (peak).", min=0)
    loss: str = setting("sum", "sum: summed over time, averaged over the batch (classic); mean: per token.",
                        choices=("sum", "mean"))
    label_smoothing: float = setting(0.1, "Label smoothing of the training loss (val loss is reported without it).",
                                     min=0, max=0.5)
    grad_clip: float = setting(5.0, "Max gradient norm (0: off).", min=0)
    schedule: str = setting("cosine", "Learning-rate schedule of the cross-entropy epochs: cosine decays to 5 %, "
                                      "step halves at 50 % and 75 %.", choices=("cosine", "step", "none"))
    weight_decay: float = setting(0.0, "Adam weight decay.", min=0)
    ema: float = setting(0.0, "Evaluate and ship an exponential moving average of the weights with this decay per "
                              "step (0: off).", min=0, max=0.999999)
    patience: int = setting(5, "Early stopping: epochs without a better val CIDEr.", min=1)
    # 8 -> 16: the transformer's val CIDEr still rose after 8 (ucm +0.08 over seeds); attn's had peaked, and
    # --patience ends its phase as before, so no decoder's best epoch is lost (benchmarks/README.md)
    scst_epochs: int = setting(16, "Self-critical epochs after the cross-entropy ones: sample captions, reward "
                                   "them with their CIDEr-D against the image's references (baseline: the image's "
                                   "other samples). --patience ends them sooner once val CIDEr stops rising.",
                               min=0)
    scst_lr: float = setting(5e-5, "Learning rate of the self-critical epochs (constant).", min=0)
    scst_start: str = setting("loss", "The cross-entropy epoch self-critical training starts from. loss: the lowest "
                                      "val loss (kept as scst_start.pt); cider: the best greedy val CIDEr (best.pt).",
                              choices=("loss", "cider"))
    scst_samples: int = setting(5, "Captions sampled per image in self-critical training.", min=2)
    seed: int = setting(0, "Seed of the initial weights, the batch order and the dropout masks.")
    device: str = setting("auto", "Where to train (auto: CUDA when torch sees one).", choices=("auto", "cpu", "cuda"))
    precision: str = setting("auto", "Decoder autocast. auto: bf16 on CUDA and on CPUs with native bf16 (about 2x "
                                     "faster), else fp32. Weights, optimizer and loss stay fp32.",
                             choices=("auto", "fp32", "bf16"))
    ram_budget_gb: float = setting(4.0, "Keep features in RAM when they fit, else stream them from the HDF5 cache.",
                                    min=0)
    checkpoint_every: int = setting(500, "Also save last.pt every N steps (0: only at epoch ends).", min=0)
    eval_batch_size: int = setting(256, "Images decoded at once in the val evaluation after each epoch.", min=1)
    fine_tune_encoder: bool = setting(False, "After the cross-entropy epochs (or from --init-from), a fine-tune phase "
                                             "of --encoder-epochs: the recorded backbone runs on the prepared images "
                                             "with its blocks from --fine-tune-from-block on trained (BatchNorm "
                                             "statistics frozen) together with the decoder; self-critical epochs then "
                                             "run on features re-extracted with it into the run folder.")
    encoder_lr: float = setting(1e-4, "Fine-tune phase: Adam learning rate of the encoder blocks (cosine-decayed "
                                      "over the phase).", min=0)
    fine_tune_from_block: int = setting(-3, "Fine-tune phase: the first trained block of the backbone (0-based; "
                                            "negative: counted from the last, -3 = the last three); the layers "
                                            "after the last block train too, those before block K stay frozen.")
    encoder_epochs: int = setting(3, "Epochs of the fine-tune phase (with --fine-tune-encoder).", min=1)
    augment: str = setting("none", "Fine-tune phase, train images only: flip-crop takes a random crop of the resized "
                                   "image instead of the centre one and flips it left-right half the time.",
                           choices=("none", "flip-crop"))
    fine_tune_decoder_lr: float = setting(1e-4, "Fine-tune phase: the decoder's learning rate (cosine-decayed over "
                                                "the phase).", min=0)
    fine_tune_workers: int = setting(2, "Fine-tune phase: DataLoader processes decoding the images (0: in the "
                                        "training process).", min=0)
    encoder_weights: str = setting("", "The backbone state_dict file the cache's features were extracted with, when "
                                       "they came from one (--weights PATH at extraction; sha256 checked); needed to "
                                       "fine-tune it.")
    init_from: str = setting("", "Start from this checkpoint's decoder (and fine-tuned encoder) instead of training "
                                 "the cross-entropy phase: the run begins with the fine-tune phase (or self-critical "
                                 "training), numbered after --epochs. Same dataset, features and decoder settings.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """A config from a mapping: training settings, ``model``, ``decoder`` and/or the decoder's
        settings at the top level (only those of ``model``'s decoder are kept from the top level: an
        older checkpoint stored every decoder's there). Other names are ignored (checkpoints of
        other versions)."""
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names and k != "decoder"})
        own = {f.name for f in option_fields(DECODERS[cfg.model].config)} if cfg.model in DECODERS else set()
        cfg.decoder = {**{k: v for k, v in d.items() if k in own and k not in names}, **dict(d.get("decoder") or {})}
        return cfg

    def validate(self) -> None:
        """Refuse a setting out of its type, bounds or choices, an unknown model, or a decoder
        setting that ``model``'s decoder does not have. Raises ``CaptionsError`` naming it."""
        entry = decoder_entry(self.model)
        own = {f.name for f in option_fields(entry.config)}
        foreign = sorted(set(self.decoder) - own)
        if foreign:
            raise CaptionsError(f"{', '.join(foreign)}: not a setting of the {self.model} decoder")
        validate(self, "training setting")
        dcfg = decoder_config(self.model, self.decoder)
        validate(dcfg, f"{self.model} setting")
        if self.init_from and not self.fine_tune_encoder and self.scst_epochs == 0:
            raise CaptionsError("--init-from skips the cross-entropy epochs: it needs --fine-tune-encoder or "
                                "--scst-epochs > 0 to have something to train")
        tuned = [flag(f.name) for f in fields(self)
                 if f.name in FINE_TUNE_SETTINGS and getattr(self, f.name) != f.default]
        if tuned and not self.fine_tune_encoder:
            raise CaptionsError(f"{', '.join(tuned)}: only with --fine-tune-encoder")
        if self.fine_tune_encoder and self.ema > 0:  # an averaged decoder would ship with an encoder it never saw
            raise CaptionsError("--ema averages the decoder alone: it cannot be used with --fine-tune-encoder")
        try:
            dcfg.check()
        except ValueError as e:
            raise CaptionsError(str(e)) from None

    @property
    def fine_tune_epochs(self) -> int:
        """Epochs of the fine-tune phase: ``encoder_epochs`` with ``fine_tune_encoder``, else 0."""
        return self.encoder_epochs if self.fine_tune_encoder else 0

    def decoder_settings(self) -> dict[str, Any]:
        """Every option setting of ``model``'s decoder: the defaults updated with ``decoder``."""
        dcfg = decoder_config(self.model, self.decoder)
        return {f.name: getattr(dcfg, f.name) for f in option_fields(type(dcfg))}

    def resolved(self) -> dict[str, Any]:
        """This config as written to the run directory: the decoder's settings all spelled out."""
        return {**dataclasses.asdict(self), "decoder": self.decoder_settings()}
