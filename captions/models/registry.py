"""The decoder registry: each decoder's name, its settings dataclass and where its module lives.

Imports no torch: the command line builds ``captions train``'s options and choices from here, and
tests read the names. Adding a decoder is one new module in ``captions/models/`` (a
``CaptionDecoder`` subclass) plus one ``register(...)`` line below with its config dataclass.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, ClassVar

from captions.errors import CaptionsError
from captions.options import internal, setting


@dataclass
class DecoderConfig:
    """Settings every decoder has. ``vocab_size`` and ``feature_dim`` come from the data."""

    uses_spatial: ClassVar[bool] = False  # reads the spatial features (N, P, C), else the pooled (N, C)
    vocab_size: int = internal(0)
    feature_dim: int = internal(0)
    dropout: float = setting(0.5, "Dropout before the output layer (transformer: in every block).", min=0, max=0.95)
    embed_dropout: float = setting(0.0, "Dropout on the word embeddings fed to the decoder.", min=0, max=0.95)

    # the fields that give the word embedding's size and the size of what the output layer reads
    dims: ClassVar[tuple[str, str]] = ("embed_dim", "hidden_dim")
    # settings added after checkpoints were written: the value that gives the behaviour a stored
    # config that lacks them was trained with (read by ``stored_decoder_config``)
    absent_means: ClassVar[dict[str, Any]] = {}

    def check(self) -> None:
        """Raise ``ValueError`` for settings that cannot go together (each alone is checked by its bounds)."""

    @property
    def input_dim(self) -> int:
        """Size of the word embeddings."""
        return int(getattr(self, self.dims[0]))

    @property
    def output_dim(self) -> int:
        """Size of the vector the output layer reads."""
        return int(getattr(self, self.dims[1]))


@dataclass
class RecurrentConfig(DecoderConfig):
    """The recurrent decoders' sizes."""

    embed_dim: int = setting(256, "Word embedding size.", min=1)
    hidden_dim: int = setting(512, "Recurrent state size.", min=1)


@dataclass
class RNNConfig(RecurrentConfig):
    """Vanilla tanh RNN (Karpathy and Fei-Fei 2015): h0 from the pooled feature."""


@dataclass
class LSTMConfig(RecurrentConfig):
    """LSTM (Vinyals et al. 2015, Show and Tell)."""

    feature_as_input: bool = setting(False, "Feed the projected feature as the first input (Show and Tell) "
                                            "instead of projecting it to h0/c0.")


@dataclass
class AttnConfig(RecurrentConfig):
    """Attention LSTM over the spatial features (Xu et al. 2015, Show, Attend and Tell)."""

    uses_spatial: ClassVar[bool] = True
    attention: str = setting("dot", "Scaled dot-product attention, or Show-Attend-Tell additive attention "
                                    "with its gate and doubly stochastic regulariser.", choices=("dot", "additive"))
    attention_dim: int = setting(256, "additive only: size of the attention MLP.", min=1)
    # summed over the positions like the summed caption loss: at 1.0 it outweighs that loss about
    # 2:1 and held ucm's greedy CIDEr back (benchmarks/README.md)
    ds_lambda: float = setting(0.1, "additive only: weight of the doubly stochastic regulariser "
                                    "lambda * sum_positions (1 - sum_t alpha)^2, added to the caption loss.", min=0)


@dataclass
class TransformerConfig(DecoderConfig):
    """Pre-norm Transformer decoder over the spatial features (Vaswani et al. 2017)."""

    uses_spatial: ClassVar[bool] = True
    dropout: float = setting(0.1, "Dropout before the output layer (transformer: in every block).", min=0, max=0.95)
    d_model: int = setting(256, "Width of the words, the memory and every block.", min=8)
    layers: int = setting(2, "Decoder blocks (masked self-attention, cross-attention over the "
                             "features, feed-forward).", min=1)
    heads: int = setting(8, "Attention heads (d-model must be a multiple).", min=1)
    ffn_dim: int = setting(512, "Hidden size of each block's feed-forward network.", min=1)
    # with global_feature: viic's mean over seeds up 0.06 and above attn's, ucm's unchanged (benchmarks/README.md)
    encoder_layers: int = setting(1, "Pre-norm Transformer encoder layers over the projected "
                                     "features before decoding (0: none, 1.6x faster to train).", min=0)
    memory_dropout: float = setting(0.5, "Dropout on the projected features (the memory) before the blocks "
                                         "attend over them (as self-critical.pytorch's att_embed; on ucm val "
                                         "CIDEr 2.730 -> 2.873 against none).", min=0, max=0.95)
    global_feature: bool = setting(True, "Add a projection of the mean feature (the whole image; attn's "
                                         "LSTM state starts from it) to every word's input.")
    positions: str = setting("sinusoidal", "Word position encodings.",
                             choices=("sinusoidal", "learned"))
    tie_embeddings: bool = setting(False, "Share the word embedding with the output layer.")
    warmup_steps: int = setting(400, "Steps of linear learning-rate warm-up before the schedule (--schedule) "
                                     "decays it; at most a quarter of the cross-entropy steps.", min=0)
    max_positions: int = internal(128)  # longest caption (words + <START>/<END>) the positions cover
    dims: ClassVar[tuple[str, str]] = ("d_model", "d_model")
    # checkpoints of the first transformers lack memory_dropout (they had none) and global_feature
    absent_means: ClassVar[dict[str, Any]] = {"memory_dropout": 0.0, "global_feature": False}

    def check(self) -> None:
        if self.d_model % self.heads:
            raise ValueError(f"--heads {self.heads} does not divide --d-model {self.d_model}")


@dataclass(frozen=True)
class DecoderEntry:
    """One registered decoder: its settings class, ``module:Class`` of its implementation, a summary."""

    name: str
    config: type[DecoderConfig]
    target: str
    summary: str

    @property
    def uses_spatial(self) -> bool:
        return self.config.uses_spatial

    def load_class(self) -> Any:
        """The decoder's ``nn.Module`` class (imports torch and its module)."""
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module), cls)


DECODERS: dict[str, DecoderEntry] = {}


def register(entry: DecoderEntry) -> None:
    DECODERS[entry.name] = entry


register(DecoderEntry("rnn", RNNConfig, "captions.models.rnn:RNNDecoder", "vanilla RNN on the pooled feature"))
register(DecoderEntry("lstm", LSTMConfig, "captions.models.rnn:LSTMDecoder", "LSTM on the pooled feature"))
register(DecoderEntry("attn", AttnConfig, "captions.models.attention:AttentionDecoder",
                      "attention LSTM over the spatial features"))
register(DecoderEntry("transformer", TransformerConfig, "captions.models.transformer:TransformerDecoder",
                      "Transformer decoder over the spatial features"))


def decoder_entry(name: str) -> DecoderEntry:
    """The registered decoder ``name``. Raises ``CaptionsError`` listing the names."""
    if name not in DECODERS:
        raise CaptionsError(f"unknown model '{name}' (choose one of: {', '.join(DECODERS)})")
    return DECODERS[name]


def decoder_config(name: str, settings: dict[str, Any] | None = None, **more: Any) -> DecoderConfig:
    """Decoder ``name``'s config from ``settings`` and keyword arguments; settings of other
    decoders are ignored (a checkpoint of an older version stored every decoder's in one dict).
    Raises ``CaptionsError`` for an unknown decoder."""
    cls = decoder_entry(name).config
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in {**(settings or {}), **more}.items() if k in names}
    return cls(**values)


def stored_decoder_config(name: str, stored: dict[str, Any]) -> DecoderConfig:
    """The config of a decoder stored in a checkpoint (its ``decoder_config``): settings it lacks
    take the behaviour it was trained with (``absent_means``), not today's defaults. Raises
    ``CaptionsError`` for an unknown decoder."""
    return decoder_config(name, {**decoder_entry(name).config.absent_means, **stored})
