"""The FastAPI application of ``captions serve``: the captioning API, its OpenAPI schema, the web page.

``create_app(captioner, options)`` wires a loaded ``Captioner`` to the routes:

* ``POST /v1/captions``: images (multipart, any number of file fields) or one raw image body ->
  one caption per image, with per-word attention (grid values and PNG overlays) on request;
* ``GET /v1/model``: what is loaded; ``GET /healthz``: ready or not;
* ``GET /``: the page (``static/``), which works offline.

Every refusal is JSON ``{"detail": "<one line>"}`` with its status (400, 413, 415, 422, 503); an
unexpected failure is a 500 with a one-line detail, never a traceback, and the server goes on.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from captions import __version__
from captions.attention_maps import heat_layer
from captions.captioner import Captioner, CaptionResult, crop_image
from captions.serve.batcher import DynamicBatcher, QueueFull
from captions.serve.schemas import CaptionsResponse, ErrorResponse, Health, ModelInfo
from captions.serve.settings import ServeOptions
from captions.serve.uploads import ApiError, Upload, check_type, declared_length, limited, read_image, spool, too_large

log = logging.getLogger("captions")

STATIC = Path(__file__).resolve().parent / "static"
# the page loads nothing from elsewhere; images are data: URLs from the API or the user's own file
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
MAX_BEAM = 20
DRAIN_FACTOR = 4  # too-large bodies up to 4 x --max-upload-mb are read (and dropped) before the 413
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "not an image, empty, truncated or malformed"},
    413: {"model": ErrorResponse, "description": "body larger than --max-upload-mb, more images in one request "
                                                 "than --queue, or an image over --max-pixels or with an "
                                                 "aspect ratio over 20:1"},
    415: {"model": ErrorResponse, "description": "not an image type (declared), or an image format not accepted"},
    422: {"model": ErrorResponse, "description": "bad parameters"},
    503: {"model": ErrorResponse, "description": "queue full (--queue): retry after the Retry-After seconds"},
}
REQUEST_BODY = {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {"image": {
        "type": "array", "items": {"type": "string", "format": "binary"},
        "description": "one or more images (any file field name is accepted)"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}, "description": "one raw image"},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}, "description": "one raw image"},
}}


@dataclass
class Job:
    """One image for the batcher: its uint8 crop (3, S, S) and how to decode it."""

    crop: torch.Tensor
    beam_size: int
    length_penalty: float


def run_batch(captioner: Captioner, jobs: Sequence[Job]) -> list[tuple[CaptionResult, int]]:
    """The batcher's work: one backbone pass over every crop, then one decoder pass per (beam size,
    length penalty) among them; returns (result, batch size) per job, in order."""
    feats = captioner.features(torch.stack([j.crop for j in jobs]))
    groups: dict[tuple[int, float], list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((job.beam_size, job.length_penalty), []).append(i)
    out: list[Any] = [None] * len(jobs)
    for (beam, penalty), rows in groups.items():
        for i, res in zip(rows, captioner.decode_features(feats[rows], beam, penalty), strict=True):
            out[i] = (res, len(jobs))
    return out


def png_data_url(img: Image.Image) -> str:
    """A PIL image as a ``data:image/png;base64,...`` URL."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def attention_json(crop: Image.Image, words: Sequence[str], maps: np.ndarray, grid: tuple[int, int]) -> dict:
    """The ``attention`` object of one image: the crop, and per word its (h, w) weights and overlay."""
    return {"grid": list(grid), "image": png_data_url(crop),
            "words": [{"word": w, "weights": np.round(m.astype(np.float64), 6).tolist(),
                       "overlay": png_data_url(heat_layer(m, crop.size))} for w, m in zip(words, maps, strict=True)]}


class CaptionService:
    """The loaded model behind the routes: admission, decoding uploads, the batcher."""

    def __init__(self, captioner: Captioner, options: ServeOptions) -> None:
        self.captioner, self.options = captioner, options
        self.batcher = DynamicBatcher(lambda jobs: run_batch(captioner, jobs), options.max_batch,
                                      options.max_wait_ms / 1000.0, options.queue)
        # image decoding runs in threads, at most one per core: bounds CPU contention and the
        # memory of full-size decoded photos at once
        self.decode_limiter = anyio.CapacityLimiter(max(1, os.cpu_count() or 1))

    def reserve(self, n: int) -> None:
        """Admit ``n`` more images, or refuse with 503."""
        try:
            self.batcher.reserve(n)
        except QueueFull as e:
            raise ApiError(503, f"queue full ({e}); retry later", headers={"Retry-After": "1"}) from None

    def decode(self, upload: Upload, what: str) -> tuple[torch.Tensor, Image.Image]:
        """An upload -> (uint8 crop (3, S, S), the crop as a PIL image). Raises ``ApiError``."""
        rgb = read_image(upload, lambda fp: self.captioner.load_file(fp, self.options.max_pixels), what)
        crop = self.captioner.crop(rgb)
        return crop, crop_image(crop)

    async def caption(self, uploads: list[Upload], beam: int, penalty: float, attention: bool) -> list[dict]:
        """Caption ``uploads`` (already admitted): decode each, batch them, answer in order."""
        crops = []
        for i, up in enumerate(uploads):
            what = f"image {i}" + (f" ({up.filename})" if up.filename else "")
            crops.append(await anyio.to_thread.run_sync(self.decode, up, what, limiter=self.decode_limiter))
        futures = [asyncio.wrap_future(self.batcher.submit(Job(c, beam, penalty))) for c, _ in crops]
        done = await asyncio.gather(*futures)
        return await anyio.to_thread.run_sync(self._rows, uploads, [p for _, p in crops], done, attention)

    def _rows(self, uploads: list[Upload], crops: list[Image.Image], done: list, attention: bool) -> list[dict]:
        rows = []
        for i, (up, crop, (res, batch)) in enumerate(zip(uploads, crops, done, strict=True)):
            row = {"index": i, "filename": up.filename, "caption": res.caption, "words": res.words,
                   "score": res.score, "batch_size": batch, "attention": None}
            if attention and res.attention is not None:
                row["attention"] = attention_json(crop, res.words, res.attention, self.captioner.spatial_shape)
            rows.append(row)
        return rows

    def model_info(self, checkpoint: str) -> dict:
        """The ``GET /v1/model`` answer (``ModelInfo``) for the loaded ``checkpoint`` path."""
        ckpt = self.captioner.decoder.checkpoint
        feats = ckpt.get("features") or {}
        o = self.options
        return {"decoder": ckpt.get("model"), "decoder_config": asdict(self.captioner.decoder.model.cfg),
                "backbone": feats.get("backbone"), "weights": feats.get("weights"),
                "image_size": feats.get("image_size"), "preprocessing": self.captioner.preprocessing.to_dict(),
                "feature_grid": list(self.captioner.spatial_shape),
                "vocab_size": len(self.captioner.decoder.idx_to_token), "max_length": self.captioner.decoder.max_length,
                "has_attention": self.captioner.has_attention, "best_val": ckpt.get("best") or {},
                "device": str(self.captioner.device), "checkpoint": checkpoint,
                "limits": {"beam_size": o.beam_size, "max_beam_size": MAX_BEAM, "max_batch": o.max_batch,
                           "max_wait_ms": o.max_wait_ms, "max_upload_bytes": o.max_upload_bytes,
                           "max_pixels": o.max_pixels, "queue": o.queue}}


async def drain(request: Request, declared: int, limit: int) -> None:
    """Read and discard a too-large body before answering 413, up to ``DRAIN_FACTOR`` times the
    limit: a client that sends its whole body before reading (most libraries, unlike curl with
    ``Expect: 100-continue``) would otherwise lose the answer to a reset connection. Larger bodies,
    and clients that wait for ``100 Continue``, are answered at once."""
    if declared > DRAIN_FACTOR * limit or "100-continue" in request.headers.get("expect", "").lower():
        return
    async for _ in request.stream():
        pass


async def read_uploads(request: Request, limit: int, max_files: int) -> list[Upload]:
    """The request's images: every file part of a multipart body, or the whole body as one image.

    Raises ``ApiError``: 413 (body over ``limit`` bytes, more than ``max_files`` files: the
    ``--queue``, so such a request could never be admitted, however long it waited), 415 (a
    body type that is not an image), 400 (malformed multipart, no file), 422 (a text field).
    """
    declared = declared_length(request.headers.get("content-length"))
    if declared is not None and declared > limit:
        await drain(request, declared, limit)
        raise too_large(declared, limit)
    ctype = request.headers.get("content-type", "")
    body = limited(request.stream(), limit)
    if not ctype.lower().startswith("multipart/form-data"):
        check_type(ctype, "the request body")
        return [Upload(None, ctype, await spool(body))]
    try:
        form = await MultiPartParser(request.headers, body, max_files=max_files, max_fields=0).parse()
    except MultiPartException as e:
        if "Too many files" in e.message:  # more images than can ever be admitted at once: not retryable
            raise ApiError(413, f"more than {max_files} images in one request (--queue {max_files}); send them "
                                "in several requests", headers={"Connection": "close"}) from None
        if "Too many fields" in e.message:
            raise ApiError(422, "multipart text fields are not read: parameters go in the query string "
                                "(?beam_size=3&attention=true)") from None
        raise ApiError(400, f"multipart body: {e.message}") from None
    uploads = [Upload(v.filename, v.content_type or "", v.file) for _, v in form.multi_items()
               if isinstance(v, UploadFile)]
    if not uploads:
        raise ApiError(400, "no file in the multipart body: send each image as a file field, e.g. image=@photo.jpg")
    return uploads


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def install_error_handlers(app: FastAPI) -> None:
    """JSON ``{"detail": one line}`` for refusals, bad parameters and anything unexpected."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_parameters(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'query')}: {e.get('msg', '')}"
                 for e in exc.errors()]
        return JSONResponse({"detail": _one_line("; ".join(parts))}, 422)

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        return JSONResponse({"detail": "the client disconnected before sending the whole body"}, 400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": _one_line(f"internal error ({type(exc).__name__}: {exc})")}, 500)


def create_app(captioner: Captioner, options: ServeOptions, checkpoint: str = "") -> FastAPI:
    """The application for a loaded ``captioner``; the batcher runs from startup to shutdown
    (uvicorn answers the requests in flight before the shutdown)."""
    service = CaptionService(captioner, options)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.batcher.start()
        yield
        await anyio.to_thread.run_sync(service.batcher.stop)

    app = FastAPI(title="captions", version=__version__, lifespan=lifespan,
                  description="Caption images with a trained `captions` checkpoint; per-word attention maps "
                              "for attention models. Errors are JSON `{\"detail\": \"one line\"}`.")
    app.state.service = service
    install_error_handlers(app)
    page = (STATIC / "index.html").read_text(encoding="utf-8")

    @app.post("/v1/captions", response_model=CaptionsResponse, responses=ERRORS,
              openapi_extra={"requestBody": REQUEST_BODY})
    async def post_captions(request: Request,
                            beam_size: int | None = Query(None, ge=1, le=MAX_BEAM,
                                                          description="beam size (1: greedy); default --beam-size"),
                            length_penalty: float = Query(0.0, ge=0.0, le=10.0,
                                                          description="rank captions by log-prob / length**P"),
                            attention: bool = Query(False, description="add per-word attention maps")) -> dict:
        """Caption one or more images: multipart file fields, or one raw image body."""
        if attention and not captioner.has_attention:
            raise ApiError(422, f"attention: this model ({captioner.decoder.checkpoint.get('model')}) has no attention")
        beam = beam_size or options.beam_size
        service.reserve(1)  # before reading: bounds the bodies held at once
        held = 1
        uploads: list[Upload] = []
        try:
            uploads = await read_uploads(request, options.max_upload_bytes, options.queue)
            service.reserve(len(uploads) - 1)
            held = len(uploads)
            rows = await service.caption(uploads, beam, length_penalty, attention)
        finally:
            service.batcher.release(held)
            for up in uploads:
                up.file.close()
        return {"model": captioner.decoder.checkpoint.get("model"), "beam_size": beam,
                "length_penalty": length_penalty, "results": rows}

    @app.get("/v1/model", response_model=ModelInfo)
    async def get_model() -> dict:
        """What is loaded: decoder, backbone and its weights, vocabulary, best val metrics, limits."""
        return service.model_info(checkpoint)

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}})
    async def healthz() -> JSONResponse:
        """200 and ready while the model worker runs; 503 otherwise."""
        b = service.batcher
        body = {"status": "ready" if b.alive else "not ready", "admitted": b.admitted, "capacity": b.capacity,
                "batches": b.batches, "images": b.items}
        return JSONResponse(body, 200 if b.alive else 503)

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        """The web page (its script and style under /static/); HEAD answers its headers only."""
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
