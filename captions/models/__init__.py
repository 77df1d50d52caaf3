"""The model layer: caption decoders, their registry and their checkpoints.

``captions.models`` itself imports no torch: it exposes the registry (``DECODERS``, the per-decoder
config dataclasses, ``decoder_config``). The decoders are in ``base`` (the shared interface),
``rnn`` (rnn, lstm) and ``attention`` (attn); ``checkpoint`` holds the checkpoint schema, its I/O,
``build_decoder`` and ``load_decoder``.
"""

from captions.models.registry import (
    DECODERS,
    AttnConfig,
    DecoderConfig,
    DecoderEntry,
    LSTMConfig,
    RNNConfig,
    decoder_config,
    decoder_entry,
    register,
)

__all__ = ["DECODERS", "AttnConfig", "DecoderConfig", "DecoderEntry", "LSTMConfig", "RNNConfig", "decoder_config",
           "decoder_entry", "register"]
