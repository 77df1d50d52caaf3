"""Image loading (any mode, EXIF-rotated) and the parallel, resumable resize into the image store."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from PIL import Image, ImageOps

from captions.errors import first_line
from captions.fsutil import write_bytes_atomic
from captions.pipeline.settings import DEFAULT_MAX_PIXELS, MAX_ASPECT_RATIO

log = logging.getLogger("captions")


class ImageRefused(ValueError):
    """An image that is readable but not used: it would decode to too many pixels, or its shape is
    too far from a photo's."""


def check_shape(width: int, height: int, max_pixels: int, decoded: tuple[int, int] | None = None) -> None:
    """Raise ``ImageRefused`` for an aspect ratio over ``MAX_ASPECT_RATIO`` or for more than
    ``max_pixels`` pixels to decode (``decoded``: the reduced size a JPEG decodes at, when less)."""
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageRefused(f"{width} x {height} pixels: aspect ratio over {MAX_ASPECT_RATIO}:1")
    dw, dh = decoded or (width, height)
    if dw * dh > max_pixels:
        raise ImageRefused(f"{width} x {height} pixels: decoding {dw * dh:,} pixels exceeds --max-pixels "
                           f"{max_pixels:,}")


def open_image(file: str | os.PathLike | IO[bytes], formats: Sequence[str] | None = None) -> Image.Image:
    """``Image.open`` (the header only; nothing is decoded) for code that bounds the pixels itself.

    PIL's own decompression-bomb limit (a fixed ~179 million pixels, and a warning above half
    that) is switched off: ``--max-pixels`` decides, through ``check_shape``, before ``load_rgb``
    decodes anything; a fixed limit below it would refuse first, with PIL's message, and one above
    it would never matter. This is the one place the package changes that setting of PIL.
    """
    Image.MAX_IMAGE_PIXELS = None  # process-wide; every decode in the package goes through load_rgb
    return Image.open(file, formats=formats)


def load_rgb(path: str | os.PathLike | IO[bytes], draft_size: int | None = None,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open any image PIL reads and return it as RGB with its EXIF orientation applied.

    ``draft_size``: for JPEGs, let the decoder downscale by a power of two while keeping both sides
    at least this large (several times faster for big photos that will be resized anyway, and it
    bounds their memory). The size is checked from the file's header before anything is decoded
    (``check_shape``: ``ImageRefused`` beyond ``max_pixels`` decoded pixels or ``MAX_ASPECT_RATIO``).

    Grayscale, 16-bit, CMYK and palette images are converted; transparency is composited onto
    white (a transparent background is white when people look at it, not black).
    Raises ``OSError``/``ValueError`` (from PIL) for unreadable or truncated files.
    """
    with open_image(path) as im:  # PIL's fixed limit off: the check below, with --max-pixels, decides
        header = im.size
        if draft_size and im.format == "JPEG":
            im.draft("RGB", (draft_size, draft_size))
        check_shape(*header, max_pixels, decoded=im.size)
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


def centre_square_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the largest centred square of a ``width`` x ``height`` image."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """The centre square of ``img`` (cropped in source coordinates, so an extreme aspect ratio costs
    nothing) resized to ``size`` x ``size`` (bicubic, antialiased)."""
    return img.resize((size, size), Image.BICUBIC, box=centre_square_box(*img.size), reducing_gap=3.0)


def store_name(image_name: str) -> str:
    """File name in the image store for a dataset image name (stable, collision-free, flat)."""
    return hashlib.sha1(image_name.encode("utf-8")).hexdigest()[:20] + ".jpg"


def source_identity(src: str | os.PathLike) -> str | None:
    """What the resized copy of ``src`` was made from: its resolved path, size and modification
    time (None when it does not exist). A change to any of them means the copy is stale."""
    try:
        st = os.stat(src)
    except (OSError, ValueError):  # ValueError: a name with a NUL byte, which no file has
        return None
    return json.dumps([str(Path(src).resolve()), st.st_size, st.st_mtime_ns])


def _finished(dst: str, size: int, identity: str | None) -> bool:
    """True when ``dst`` is a whole resized copy of the right size made from the source
    ``identity``: it must end with the JPEG end-of-image marker and its data must decode to the
    end (a file cut short by a full disk or a crash, under whatever name, is redone; its header
    alone would pass). The decode is at 1/8 scale: every coefficient is still read, at about 70%
    of the cost (0.44 ms instead of 0.61 ms for a 256 x 256 copy)."""
    if identity is None:
        return False
    try:
        with open(dst, "rb") as f:
            data = f.read()
        if not data.endswith(b"\xff\xd9"):
            return False
        with open_image(io.BytesIO(data), formats=("JPEG",)) as done:
            if done.size != (size, size) or done.info.get("comment", b"") != identity.encode():
                return False
            done.draft("RGB", (max(size // 8, 1), max(size // 8, 1)))
            done.load()  # raises for truncated or corrupt data
        return True
    except (OSError, SyntaxError, ValueError):
        return False  # absent, or an unreadable leftover: redo it


def resize_one(src: str, dst: str, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, quality: int = 95) -> str | None:
    """Resize ``src`` into ``dst`` unless a finished ``dst`` of the right size, made from the same
    source file (path, size, modification time: kept in the JPEG's comment), exists.

    The JPEG is encoded in memory and written with ``write_bytes_atomic`` (a temporary name, every
    byte or ``OSError``, a rename; PIL writing to the file itself leaves a short write unnoticed),
    so ``dst`` is whole or absent. It is not flushed to the disk one by one (``fsync`` doubled the
    time of a resize): ``prepare`` flushes the whole folder once before its manifest, and a copy a
    crash left incomplete fails ``_finished`` and is redone. Returns None on success, else a
    one-line reason the image was skipped; raises ``OutputError`` naming ``dst`` when it cannot be
    written (a full disk, a read-only folder).
    """
    identity = source_identity(src)
    if os.path.exists(dst) and _finished(dst, size, identity):
        return None
    if identity is None:
        return "image file not found"
    try:
        img = resize_square(load_rgb(src, draft_size=size, max_pixels=max_pixels), size)
    except FileNotFoundError:
        return "image file not found"
    except ImageRefused as e:
        return f"image refused ({e})"
    except Exception as e:  # PIL raises many types for corrupt data; any of them means "skip this image"
        return f"unreadable image ({type(e).__name__}: {first_line(e, 'no detail')})"
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, comment=identity)
    write_bytes_atomic(dst, buf.getvalue(), fsync=False, fault=("prepare", "image"))
    return None


def resize_all(
    pairs: Sequence[tuple[Path, Path]], size: int, workers: int = -1, progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[str | None]:
    """Resize each ``(source, destination)`` pair in parallel (joblib processes, one per core by default).

    Returns, for each pair in order, None when the resized copy is ready or the skip reason.
    Finished files made from the same source files are kept, so an interrupted run resumes where
    it stopped; a source that changed (or moved) is resized again. The worker processes end with
    this one, even when it is killed (``exit_with_parent``). Raises ``OutputError`` when a copy
    cannot be written.
    """
    from joblib import Parallel, delayed, parallel_config
    from tqdm import tqdm

    jobs = [delayed(resize_one)(str(src), str(dst), size, max_pixels) for src, dst in pairs]
    n_jobs = workers if workers and workers > 0 else (os.cpu_count() or 1)
    if n_jobs == 1 or len(jobs) < 8:
        return list(tqdm((fn(*args, **kw) for fn, args, kw in jobs), total=len(jobs), desc="resize", unit="img",
                         disable=not progress))
    # loky's workers, each watching for the death of this process (the initializer)
    with parallel_config(backend="loky", initializer=exit_with_parent, initargs=(os.getpid(),)):
        results_iter = Parallel(n_jobs=n_jobs, return_as="generator", batch_size=16)(jobs)
        return list(tqdm(results_iter, total=len(jobs), desc="resize", unit="img", disable=not progress))


def exit_with_parent(parent: int, interval: float = 0.2) -> None:
    """Worker initializer: end this worker process (``os._exit``, at once, busy or idle) when
    process ``parent``, which started it, is gone. joblib's (loky's) workers wait for work up to
    300 s and finish the batches they hold, so after a killed ``prepare`` they ran on for over a
    minute. The parent's death shows as another parent pid (the orphan is adopted), checked every
    ``interval`` seconds by a daemon thread; also when it died while this worker was starting."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
