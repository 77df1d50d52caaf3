"""The accepted backbone names and what each gives (``captions backbones [PATTERN]``).

Channels and grid come from the model itself, built on the meta device (no memory, no weights:
about half a second each for timm and torchvision, instant for open_clip, whose configs say
them), at the model's default input size; the weights source is the library's metadata.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

from captions.errors import CaptionsError
from captions.features.backbones import family_of

DETAIL_LIMIT = 20  # more matches than this are listed without channels and grid unless asked


@cache
def family_names(family: str) -> tuple[str, ...]:
    """The accepted names of one family (``torchvision``, ``timm``, ``open_clip``); () when its
    library is not installed."""
    try:
        if family == "torchvision":
            from captions.features.zoo_torchvision import names
        elif family == "timm":
            from captions.features.zoo_timm import names
        else:
            from captions.features.zoo_open_clip import names
        return names()
    except ImportError:
        return ()


def all_names() -> list[str]:
    """Every accepted name: torchvision models, ``timm/<model>``, ``open_clip/<model>:<tag>``."""
    return [n for family in ("torchvision", "timm", "open_clip") for n in family_names(family)]


def matching(pattern: str | None) -> list[str]:
    """The accepted names matching ``pattern``: a shell glob when it has ``*?[``, else a
    case-insensitive substring; all names for None."""
    names = all_names()
    if not pattern:
        return names
    if any(c in pattern for c in "*?["):
        return [n for n in names if fnmatch.fnmatchcase(n.lower(), pattern.lower())]
    return [n for n in names if pattern.lower() in n.lower()]


@dataclass(frozen=True)
class BackboneInfo:
    """One line of ``captions backbones``: ``channels`` and ``grid`` at ``image_size`` (the model's
    default input size), or None when not computed; ``weights``: where default weights come from."""

    name: str
    weights: str
    channels: int | None = None
    grid: tuple[int, int] | None = None
    image_size: int | None = None
    note: str = ""


def weights_source(name: str) -> str:
    """Where ``--weights default`` takes ``name``'s weights from (library metadata only)."""
    family = family_of(name)
    if family == "torchvision":
        from torchvision.models import get_model_weights

        return f"torchvision:{get_model_weights(name).DEFAULT}"
    if family == "timm":
        from captions.features.zoo_timm import weights_source as timm_source

        return timm_source(name.split("/", 1)[1])
    from captions.features.zoo_open_clip import describe

    return describe(name)[3]


def describe(name: str, details: bool = True) -> BackboneInfo:
    """What ``name`` gives: with ``details``, channels and grid from a meta-device build; a model
    that cannot be described says why in ``note``."""
    family = family_of(name)
    try:
        if not details:
            return BackboneInfo(name, weights_source(name))
        if family == "torchvision":
            from captions.features.zoo_torchvision import describe as how
        elif family == "timm":
            from captions.features.zoo_timm import describe as how
        else:
            from captions.features.zoo_open_clip import describe as how
        channels, grid, size, source = how(name)
        return BackboneInfo(name, source, channels, grid, size)
    except CaptionsError as e:
        return BackboneInfo(name, "?", note=str(e))
    except Exception as e:  # a model that does not build on the meta device
        return BackboneInfo(name, "?", note=f"not described ({type(e).__name__})")


def backbones(pattern: str | None, details: bool | None = None) -> Iterator[BackboneInfo]:
    """``describe`` each name matching ``pattern`` (see ``matching``), in order; ``details``
    None: channels and grid only when at most ``DETAIL_LIMIT`` names match."""
    names = matching(pattern)
    detailed = len(names) <= DETAIL_LIMIT if details is None else details
    for name in names:
        yield describe(name, detailed)


def format_info(info: BackboneInfo) -> str:
    """One aligned line: name, channels, grid @ size, weights source (or the note)."""
    channels = str(info.channels) if info.channels is not None else "-"
    grid = f"{info.grid[0]}x{info.grid[1]} @{info.image_size}" if info.grid else "-"
    return f"{info.name:48s} {channels:>6s}  {grid:>12s}  {info.note or info.weights}"
