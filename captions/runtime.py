"""Where and how tensors run: device and precision choice, and the CPU allocator setting that
extraction and training share."""

from __future__ import annotations

import contextlib

import torch

from captions.errors import CaptionsError


def resolve_device(device: str) -> torch.device:
    """``auto``|``cpu``|``cuda`` -> the torch device (``auto``: CUDA when torch sees one)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CaptionsError("--device cuda asked for, but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise CaptionsError(f"unknown device '{device}' (auto, cpu or cuda)")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the forward pass, None for plain float32.

    ``auto``: bf16 on CUDA (fp16 where bf16 is unsupported) and on CPUs with native bf16
    (AVX512-BF16 / AMX, where it measured 2-3x faster than fp32), float32 elsewhere.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise CaptionsError(f"unknown precision '{precision}' (auto, fp32, bf16 or fp16)")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


@contextlib.contextmanager
def retained_heap():
    """While inside, glibc keeps freed memory for reuse instead of handing it back to the kernel.

    Every forward allocates its activations afresh (tens of MB per layer for a batch); by default
    glibc serves big blocks with mmap and returns freed ones, so each forward page-faults all its
    activation memory again. On the benchmark VM a page fault costs ~3 us, and that was 25-50 % of
    the CPU time of a forward (regnet_x_400mf 734 faults/image, tf_efficientnet_lite0 3,300). Here
    glibc takes big blocks from its heap and does not trim it (mallopt M_MMAP_MAX = 0, a high
    M_TRIM_THRESHOLD): memory stays at the run's peak until the end, where defaults are restored
    and the heap is trimmed. A no-op without glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        yield
        return
    m_trim_threshold, m_mmap_max = -1, -4
    mallopt(m_trim_threshold, 2**31 - 1)
    mallopt(m_mmap_max, 0)
    try:
        yield
    finally:
        mallopt(m_mmap_max, 65536)  # glibc's defaults
        mallopt(m_trim_threshold, 128 * 1024)
        malloc_trim(0)
