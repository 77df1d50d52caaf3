"""The API's JSON shapes (pydantic models): they document ``/openapi.json`` and ``/docs``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class WordAttention(BaseModel):
    """One generated word and where the model looked for it."""

    word: str
    weights: list[list[float]] = Field(description="(h, w) attention weights over the CNN's feature grid, "
                                                   "row-major; they sum to 1")
    overlay: str = Field(description="PNG data URL: RGBA heat map of the weights at the crop's size, to lay "
                                     "over `image`")


class Attention(BaseModel):
    """Per-word attention of one image (attention models, with ?attention=true)."""

    grid: list[int] = Field(description="[h, w] of the feature grid")
    image: str = Field(description="PNG data URL of the centre crop the CNN saw (the maps' frame)")
    words: list[WordAttention]


class ImageCaption(BaseModel):
    """The caption of one uploaded image."""

    index: int = Field(description="position of the image in the request")
    filename: str | None = Field(description="multipart filename, or null for a raw body")
    caption: str
    words: list[str]
    score: float = Field(description="summed log-probability of the words and <END>")
    batch_size: int = Field(description="images in the backbone + decoder batch that captioned this one")
    attention: Attention | None = Field(None, description="with ?attention=true (attention models only)")


class CaptionsResponse(BaseModel):
    """One result per uploaded image, in the order they were sent."""

    model: str = Field(description="decoder name (rnn, lstm, attn)")
    beam_size: int
    length_penalty: float
    results: list[ImageCaption]


class ErrorResponse(BaseModel):
    """Every refusal: its HTTP status and one line saying why."""

    detail: str = Field(description="what went wrong, in one line")


class ModelInfo(BaseModel):
    """What the server has loaded, and its limits."""

    decoder: str
    decoder_config: dict[str, Any]
    backbone: str
    weights: str = Field(description="identity of the backbone weights: library name, sha256:<hex> of a "
                                     "state_dict file, or random")
    image_size: int
    preprocessing: dict[str, Any]
    feature_grid: list[int]
    vocab_size: int
    max_length: int
    has_attention: bool
    best_val: dict[str, Any] = Field(description="the training run's best epoch and its val metrics")
    device: str
    checkpoint: str
    limits: dict[str, Any] = Field(description="the server's settings: beam size, batching and upload limits")


class Health(BaseModel):
    """Readiness and load."""

    status: str = Field(description="ready, or not ready (the model worker has stopped)")
    admitted: int = Field(description="images admitted now (read, decoded, queued or being captioned)")
    capacity: int = Field(description="--queue")
    batches: int = Field(description="batches run so far")
    images: int = Field(description="images captioned so far")
