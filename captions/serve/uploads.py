"""Request bodies and images within the service's limits; every refusal is an ``ApiError`` with
its HTTP status and a one-line message.

An upload is read in full only while it stays under ``--max-upload-mb`` (a declared larger
``Content-Length`` is refused before reading), its format is identified from the header among
the accepted ones, and it is decoded only after the header shows a size within ``--max-pixels``
and an aspect ratio a photo can have: a PNG of 110 kB can declare 30000 x 30000 pixels.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import IO

from PIL import Image, UnidentifiedImageError

from captions.errors import first_line
from captions.pipeline.resize import ImageRefused, open_image

# formats PIL decodes in-process; others (EPS runs Ghostscript, PDF, PSD...) are refused with 415
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes MPO (phone photos)
ACCEPTED_TYPES = ("image/", "application/octet-stream")
# the image/* subtypes (an "x-" prefix dropped) that name an accepted format; any other declared
# image type is refused with 415 when the content is not one of the accepted formats either
ACCEPTED_SUBTYPES = frozenset({"jpeg", "jpg", "pjpeg", "mpo", "png", "apng", "webp", "gif", "bmp", "ms-bmp", "tiff",
                               "tif"})
SPOOL_BYTES = 1 << 20  # bodies up to 1 MB stay in memory, larger ones go to a temporary file


class ApiError(Exception):
    """A request the service refuses: ``status`` (400, 413, 415, 422, 503) and a one-line message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class Upload:
    """One uploaded file: its name (multipart filename, or None), declared type and content."""

    filename: str | None
    content_type: str
    file: IO[bytes]


def declared_length(content_length: str | None) -> int | None:
    """The ``Content-Length`` header as a number (None when absent); 400 when it is not one."""
    if content_length is None:
        return None
    try:
        return int(content_length)
    except ValueError:
        raise ApiError(400, f"Content-Length '{content_length}' is not a number") from None


def too_large(declared: int, limit: int) -> ApiError:
    """The 413 for a body that declares more than ``limit`` bytes."""
    return ApiError(413, f"request body of {declared} bytes is larger than --max-upload-mb ({limit} bytes)")


async def limited(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """Pass ``chunks`` through, raising ``ApiError`` 413 once more than ``limit`` bytes came (for
    chunked bodies and bodies longer than they declared)."""
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if seen > limit:
            raise ApiError(413, f"request body is larger than --max-upload-mb ({limit} bytes)",
                           headers={"Connection": "close"})
        yield chunk


async def spool(chunks: AsyncIterator[bytes]) -> IO[bytes]:
    """Collect a body into a file object (in memory up to 1 MB, then on disk), rewound."""
    out = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
    async for chunk in chunks:
        out.write(chunk)
    out.seek(0)
    return out


def check_type(content_type: str, what: str) -> None:
    """Refuse (415) a declared type that is not an image (``image/*``, or unknown octets)."""
    kind = content_type.split(";")[0].strip().lower()
    if kind and not kind.startswith(ACCEPTED_TYPES):
        raise ApiError(415, f"{what} is {kind}, not an image; send JPEG, PNG, WebP, GIF, BMP or TIFF")


def unaccepted_image_type(content_type: str) -> str | None:
    """The declared type when it is an image type of a format not accepted (``image/svg+xml``,
    ``image/x-icon``, ``image/heic``...), else None."""
    kind = content_type.split(";")[0].strip().lower()
    if not kind.startswith("image/"):
        return None
    sub = kind.removeprefix("image/")
    return None if sub.removeprefix("x-") in ACCEPTED_SUBTYPES else kind


# the accepted formats' magic numbers of three bytes or more (BMP's "BM" would match plain text)
_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
               (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def _signature(head: bytes) -> str | None:
    """The accepted format whose magic number ``head`` (the first 16 bytes) starts with, else None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)


def _refuse_unreadable(fp: IO[bytes], what: str, error: Exception | None, content_type: str = "") -> ApiError:
    """Why PIL could not open ``fp`` among the accepted formats: another image format, found in
    the content or declared by ``content_type`` (415), or not an image at all (400)."""
    fp.seek(0)
    head = fp.read(16)
    if head[4:8] == b"ftyp":  # ISO media: HEIC/AVIF photos, which PIL does not decode without plugins
        return ApiError(415, f"{what} is a HEIC/AVIF (ISO media) file; send JPEG, PNG, WebP, GIF, BMP or TIFF")
    fp.seek(0)
    try:
        with open_image(fp) as other:  # header only: nothing of another format is decoded
            fmt = other.format
    except Exception:  # any failure here means "not an image"
        fmt = None
    if fmt:
        return ApiError(415, f"{what} is an image in {fmt} format; accepted: {', '.join(ACCEPTED_FORMATS)}")
    declared = unaccepted_image_type(content_type)
    if declared:  # SVG (text, which PIL does not read), and formats PIL has no plugin for
        return ApiError(415, f"{what} is declared {declared}, an image format not accepted; send JPEG, PNG, "
                             "WebP, GIF, BMP or TIFF")
    if error is None and (started := _signature(head)):
        return ApiError(400, f"{what} starts like a {started} file but its header is damaged or cut off")
    if error is None:
        return ApiError(400, f"{what} is not an image (no {', '.join(ACCEPTED_FORMATS)} header)")
    return ApiError(400, f"{what} cannot be read as an image ({type(error).__name__}: {first_line(error)})")


def read_image(upload: Upload, load: Callable[[IO[bytes]], Image.Image], what: str) -> Image.Image:
    """An upload -> RGB PIL image through ``load`` (``Captioner.load_file``: the same decoding as
    ``captions caption``'s, with its pixel and aspect-ratio checks made from the header).

    Raises ``ApiError``: 415 for a declared non-image type or an image format not accepted
    (identified from the content, or declared as ``image/svg+xml``... when the content is no
    accepted format), 400 for an empty, unreadable or truncated file, 413 for too many pixels or
    an aspect ratio no photo has (``ImageRefused``: nothing was decoded). PIL's own fixed pixel
    limit plays no part (``open_image``): ``--max-pixels`` decides.
    """
    check_type(upload.content_type, what)
    fp = upload.file
    fp.seek(0, io.SEEK_END)
    if fp.tell() == 0:
        raise ApiError(400, f"{what} is empty (0 bytes)")
    fp.seek(0)
    Image.init()  # registers every plugin: open(formats=...) only knows the ones loaded so far
    try:  # identify only (the header): other formats never reach a decoder
        with open_image(fp, formats=ACCEPTED_FORMATS):  # leaving the block keeps fp open (close() would not)
            pass
    except UnidentifiedImageError:
        raise _refuse_unreadable(fp, what, None, upload.content_type) from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's other ways of saying "not this"
        raise _refuse_unreadable(fp, what, e, upload.content_type) from None
    fp.seek(0)
    try:
        return load(fp)
    except ImageRefused as e:
        raise ApiError(413, f"{what} refused: {e}") from None
    except Exception as e:  # PIL raises many types for corrupt data
        raise ApiError(400, f"{what} cannot be decoded ({type(e).__name__}: {first_line(e)})") from None
