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
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from captions.errors import CaptionsError, first_line

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


def as_option(name: str, value: Any) -> str:
    """A setting as it is given on the command line: ``("hidden_dim", 32)`` -> ``--hidden-dim 32``,
    ``("global_feature", False)`` -> ``--no-global-feature``."""
    if isinstance(value, bool):
        return flag(name) if value else "--no-" + flag(name)[2:]
    return f"{flag(name)} {value}"


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
    if isinstance(value, bool):  # --x/--no-x, so that a command line can turn off what a config file set
        return click.option(f"{as_option(f.name, True)}/{as_option(f.name, False)}", f.name, default=value,
                            help=help_text, show_default=True)
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


def checked_value(f: dataclasses.Field, value: Any) -> Any:
    """``value`` for ``setting`` field ``f`` if it has the field's type and lies within its bounds
    and choices (a whole float is taken for an int; a string that reads as a number for a float,
    as PyYAML leaves ``1e-3``). Raises ``ValueError`` with a short reason."""
    meta, default = f.metadata[_KEY], field_default(f)
    if value is None:
        raise ValueError("needs a value")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise ValueError(f"must be a whole number, got {value!r}")
        value = int(value)
    elif isinstance(default, float):
        if isinstance(value, bool):
            raise ValueError(f"must be a number, got {value!r}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number, got {value!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value!r}")
    elif isinstance(default, str) and not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    if meta["choices"] and value not in meta["choices"]:
        raise ValueError(f"must be one of {', '.join(meta['choices'])}, got {value!r}")
    if (meta["min"] is not None and value < meta["min"]) or (meta["max"] is not None and value > meta["max"]):
        bounds = f"between {meta['min']} and {meta['max']}" if meta["max"] is not None else f">= {meta['min']}"
        raise ValueError(f"must be {bounds}, got {value!r}")
    return value


def validate(obj: Any, what: str) -> None:
    """Check every ``setting`` field of dataclass instance ``obj`` with ``checked_value``.
    Raises ``CaptionsError("<what>: <name> <reason>")`` for the first bad one."""
    for f in option_fields(type(obj)):
        try:
            checked_value(f, getattr(obj, f.name))
        except ValueError as e:
            raise CaptionsError(f"{what}: {f.name.replace('_', '-')} {e}") from None


def _parse_reason(e: Exception) -> str:
    """What a parser found and where: PyYAML's first line is only its context ("while parsing a
    flow sequence"); its problem and 1-based position follow. JSON's first line has both."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem}, line {mark.line + 1}, column {mark.column + 1}"
    return first_line(e)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A settings file (YAML or JSON, by suffix; ``.yml``/``.yaml`` read with PyYAML) -> a mapping
    of setting names (dashes or underscores) to values. Raises ``CaptionsError`` naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise CaptionsError(f"cannot read the config file ({e.strerror})", path) from None
    except UnicodeDecodeError as e:
        raise CaptionsError(f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})", path) from None
    try:
        if path.suffix.lower() in (".yml", ".yaml"):
            import yaml

            data = yaml.load(text, Loader=_unique_keys_loader())  # a SafeLoader: no Python objects
        else:
            data = json.loads(text, object_pairs_hook=_unique_pairs)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: one line either way
        raise CaptionsError(f"not valid {'YAML' if path.suffix.lower() in ('.yml', '.yaml') else 'JSON'} "
                            f"({_parse_reason(e)})", path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CaptionsError("a config file must hold a mapping of setting names to values", path)
    return setting_names(data, path)


def setting_names(mapping: dict, path: Path) -> dict[str, Any]:
    """``mapping``'s keys as setting names (dashes -> underscores). Raises ``CaptionsError`` naming
    ``path`` when two keys name one setting (``scst-epochs`` and ``scst_epochs``): which would win
    is an accident of the file's order."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = str(key).replace("-", "_")
        if name in out:
            raise CaptionsError(f"{name.replace('_', '-')} is given twice", path)
        out[name] = value
    return out


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if dup := next((k for k in keys if keys.count(k) > 1), None):
        raise ValueError(f"key {dup!r} appears twice in one object")
    return dict(pairs)


def _unique_keys_loader():
    """PyYAML's SafeLoader, refusing a mapping that repeats a key (it keeps the last silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"found duplicate key {key!r}",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader
