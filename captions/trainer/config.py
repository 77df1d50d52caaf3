"""``TrainConfig``: every setting of ``captions train``, with its default.

Kept free of torch so that the command line can show these defaults in ``--help`` without
importing torch at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class TrainConfig:
    """Everything ``captions train`` can be told; stored in every checkpoint."""

    model: str = "attn"
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    embed_dim: int = 256
    hidden_dim: int = 512
    attention: str = "dot"
    attention_dim: int = 256
    dropout: float = 0.5
    embed_dropout: float = 0.0
    feature_as_input: bool = False
    # additive attention's doubly stochastic regulariser, summed over the positions like the summed
    # caption loss; at 1.0 it outweighs that loss about 2:1 and held ucm's greedy CIDEr back
    ds_lambda: float = 0.1
    loss: str = "sum"
    label_smoothing: float = 0.1
    grad_clip: float = 5.0
    schedule: str = "cosine"
    weight_decay: float = 0.0
    ema: float = 0.0  # decay of the weights' exponential moving average (0: off)
    patience: int = 5
    scst_epochs: int = 8  # self-critical epochs after the cross-entropy ones (0: none)
    scst_lr: float = 5e-5
    scst_start: str = "loss"  # loss | cider: self-critical training starts from the cross-entropy epoch
    # of the lowest val loss or of the best val CIDEr
    scst_samples: int = 5  # sampled captions per image
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16: autocast of the decoder's matrix products
    ram_budget_gb: float = 4.0
    checkpoint_every: int = 500
    eval_batch_size: int = 256

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
