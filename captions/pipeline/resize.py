"""Image loading (any mode, EXIF-rotated) and the parallel, resumable resize into the image store."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageOps

from captions.fsutil import atomic_path

log = logging.getLogger("captions")


def load_rgb(path: str | os.PathLike, draft_size: int | None = None) -> Image.Image:
    """Open any image PIL reads and return it as RGB with its EXIF orientation applied.

    ``draft_size``: for JPEGs, let the decoder downscale by a power of two while keeping both sides
    at least this large (several times faster for big photos that will be resized anyway).

    Grayscale, 16-bit, CMYK and palette images are converted; transparency is composited onto
    white (a transparent background is white when people look at it, not black).
    Raises ``OSError``/``ValueError`` (from PIL) for unreadable or truncated files.
    """
    with Image.open(path) as im:
        if draft_size and im.format == "JPEG":
            im.draft("RGB", (draft_size, draft_size))
        im.load()  # force the decode now so truncation errors surface here
        return to_rgb(ImageOps.exif_transpose(im))


def to_rgb(im: Image.Image) -> Image.Image:
    """An opened PIL image of any mode as RGB: transparency composited onto white, 16-bit scaled."""
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        im = im.point(lambda v: v / 256).convert("L")
    return im.convert("RGB")


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to ``size`` (bicubic, antialiased) and centre-crop to ``size`` x ``size``."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def store_name(image_name: str) -> str:
    """File name in the image store for a dataset image name (stable, collision-free, flat)."""
    return hashlib.sha1(image_name.encode("utf-8")).hexdigest()[:20] + ".jpg"


def resize_one(src: str, dst: str, size: int, quality: int = 95) -> str | None:
    """Resize ``src`` into ``dst`` unless a finished ``dst`` of the right size exists.

    Returns None on success, else a one-line reason the image was skipped.
    """
    if os.path.exists(dst):
        try:
            with Image.open(dst) as done:
                if done.size == (size, size):
                    return None
        except OSError:
            pass  # unreadable leftover: redo it
    try:
        img = resize_square(load_rgb(src, draft_size=size), size)
    except FileNotFoundError:
        return "image file not found"
    except Exception as e:  # PIL raises many types for corrupt data; any of them means "skip this image"
        return f"unreadable image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})"
    with atomic_path(dst) as tmp:
        img.save(tmp, format="JPEG", quality=quality)
    return None


def resize_all(
    pairs: Sequence[tuple[Path, Path]], size: int, workers: int = -1, progress: bool = True
) -> list[str | None]:
    """Resize each ``(source, destination)`` pair in parallel (joblib processes, one per core by default).

    Returns, for each pair in order, None when the resized copy is ready or the skip reason.
    Finished files are kept, so an interrupted run resumes where it stopped.
    """
    from joblib import Parallel, delayed
    from tqdm import tqdm

    jobs = [delayed(resize_one)(str(src), str(dst), size) for src, dst in pairs]
    n_jobs = workers if workers and workers > 0 else (os.cpu_count() or 1)
    if n_jobs == 1 or len(jobs) < 8:
        results_iter = (fn(*args, **kw) for fn, args, kw in jobs)
    else:
        results_iter = Parallel(n_jobs=n_jobs, return_as="generator", batch_size=16)(jobs)
    return list(tqdm(results_iter, total=len(jobs), desc="resize", unit="img", disable=not progress))
