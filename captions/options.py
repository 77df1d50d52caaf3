"""Settings written once: dataclass fields that carry their help text, and the click options and
config-file reading generated from them.

A field made with ``setting(default, help, ...)`` is a command-line option ``--field-name`` with
that default and help; one made with ``internal(default)`` is not (values the program fills in,
such as a decoder's vocabulary size). Imports neither torch nor click at module level, so the
command line's ``--help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from captions.errors import CaptionsError

_KEY = "captions"


def setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None, min: float | None = None,
            max: float | None = None) -> Any:
    """A dataclass field that is also a command-line option (``--name-with-dashes``).

    ``choices`` makes it a choice among strings; ``min`` / ``max`` bound numbers (inclusive). A
    bool field becomes an on/off flag. Mutable defaults (lists) are copied per instance.
    """
    meta = {_KEY: {"help": help, "choices": choices, "min": min, "max": max}}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def internal(default: Any) -> Any:
    """A dataclass field that is not an option (filled in by the program)."""
    return dataclasses.field(default=default, metadata={_KEY: None})


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of dataclass ``cls`` made with ``setting``, in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get(_KEY)]


def flag(name: str) -> str:
    """Field name -> its option, ``scst_lr`` -> ``--scst-lr``."""
    return "--" + name.replace("_", "-")


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (made by its factory for mutable defaults)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def click_option(f: dataclasses.Field, note: str = "", shown_default: str | None = None) -> Callable:
    """The ``click.option`` decorator of one ``setting`` field; ``note`` is appended to the help.

    ``shown_default``: the option's default is None (the value is left to the dataclass, whose
    default differs between the classes that share the option) and ``--help`` shows this text.
    """
    import click

    meta = f.metadata[_KEY]
    value = field_default(f)
    help_text = meta["help"] + (f" {note}" if note else "")
    if isinstance(value, bool):
        return click.option(flag(f.name), f.name, is_flag=True, default=value, help=help_text)
    kind: Any = type(value)
    if meta["choices"]:
        kind = click.Choice(list(meta["choices"]))
    elif meta["min"] is not None or meta["max"] is not None:
        kind = (click.IntRange if isinstance(value, int) else click.FloatRange)(meta["min"], meta["max"])
    if shown_default is not None:
        return click.option(flag(f.name), f.name, type=kind, default=None, show_default=shown_default,
                            help=help_text)
    return click.option(flag(f.name), f.name, type=kind, default=value, show_default=True, help=help_text)


def click_options(fields: Iterable[tuple[dataclasses.Field, str] | tuple[dataclasses.Field, str, str]]) -> Callable:
    """A decorator adding one option per (field, note[, shown default]), in the order given (as
    ``--help`` lists them); see ``click_option``."""
    fields = list(fields)

    def decorate(fn: Callable) -> Callable:
        for f, *rest in reversed(fields):
            fn = click_option(f, *rest)(fn)
        return fn
    return decorate


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A settings file (YAML or JSON, by suffix; ``.yml``/``.yaml`` read with PyYAML) -> a mapping
    of setting names (dashes or underscores) to values. Raises ``CaptionsError`` naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise CaptionsError(f"cannot read the config file ({e.strerror})", path) from None
    try:
        if path.suffix.lower() in (".yml", ".yaml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: one line either way
        raise CaptionsError(f"not valid {'YAML' if path.suffix.lower() in ('.yml', '.yaml') else 'JSON'} "
                            f"({str(e).splitlines()[0]})", path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CaptionsError("a config file must hold a mapping of setting names to values", path)
    return {str(k).replace("-", "_"): v for k, v in data.items()}
