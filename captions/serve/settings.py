"""Settings of ``captions serve``, written once (the command's options are generated from them)."""

from __future__ import annotations

from dataclasses import dataclass

from captions.options import setting
from captions.pipeline.settings import DEFAULT_MAX_PIXELS


@dataclass
class ServeOptions:
    """What ``captions serve`` listens on and how much it accepts.

    ``queue`` counts images admitted at once (being read, decoded, waiting for a batch or being
    captioned); a request that would exceed it is answered 503. ``max_upload_mb`` bounds a request's
    body, ``max_pixels`` the pixels an image decodes to (JPEGs decode reduced).
    """

    host: str = setting("127.0.0.1", "Address to listen on (0.0.0.0: every interface; see README on proxies).")
    port: int = setting(8000, "TCP port.", min=1, max=65535)
    device: str = setting("auto", "Where to run the CNN and decoder (auto: CUDA when torch sees one).",
                          choices=("auto", "cpu", "cuda"))
    beam_size: int = setting(3, "Default beam size (a request may ask for another with ?beam_size=K).", min=1,
                             max=20)
    max_batch: int = setting(16, "Most images in one backbone + decoder batch (1: no batching).", min=1)
    max_wait_ms: float = setting(10.0, "Longest wait for more images to fill a batch after the first arrives.",
                                 min=0)
    max_upload_mb: float = setting(20.0, "Largest request body in MB (larger: 413).", min=0.001)
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, "Largest image in pixels to decode (larger: 413).", min=1)
    queue: int = setting(64, "Most images admitted at once (more: 503 with Retry-After).", min=1)

    @property
    def max_upload_bytes(self) -> int:
        """``max_upload_mb`` in bytes (decimal megabytes, as HTTP sizes are)."""
        return int(self.max_upload_mb * 1_000_000)
