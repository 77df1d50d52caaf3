"""What a training run needs beside the model: random-number state, Ctrl-C handling, the EMA
update, and the training precision."""

from __future__ import annotations

import logging
import random
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from captions.errors import CaptionsError
from captions.runtime import resolve_precision

log = logging.getLogger("captions")


class TrainingInterrupted(CaptionsError):
    """Raised after the checkpoint of an interrupted run is saved."""


def train_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The training autocast dtype (None: plain fp32).

    ``auto``: bf16 on CUDA with bf16 and on CPUs with native bf16 (AVX512-BF16/AMX: 2.2x faster
    for attn here, benchmarks/README.md), else fp32. Weights, optimizer state, the loss and the
    LSTM cell state stay fp32. fp16 is not offered: it would need loss scaling.
    Raises ``CaptionsError`` for another value.
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
    """torch's, Python's (and CUDA's) random-number states, for a checkpoint."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state()`` (Python's state comes back from a checkpoint as lists)."""
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopFlag:
    """Ctrl-C during training sets a flag checked between steps, so the checkpoint saved on the
    way out is always at a clean step boundary; a second Ctrl-C leaves at once."""

    def __init__(self) -> None:
        self.stop = False
        self._old = None

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_: Any) -> None:
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        log.warning("interrupt: saving a checkpoint at the end of this step (Ctrl-C again to quit now)")

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


@contextmanager
def immediate_interrupt() -> Iterator[None]:
    """Within: Ctrl-C raises ``KeyboardInterrupt`` at once (Python's own handler), for work that
    has no step boundary to wait for and resumes by itself (an extraction into a partial cache)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def ignore_interrupt(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers leave Ctrl-C to the training process (which stops
    them), instead of each running its inherited handler."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
