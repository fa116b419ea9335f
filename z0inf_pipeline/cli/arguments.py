"""CLI flags of the settings models, by pydantic-settings (``CliSettingsSource``) on the commands' own
argparse parsers: ``--field-name`` per field, its description as help with the default, ``Literal`` fields
as choices, ``--flag/--no-flag`` for booleans, lists as ``--hidden 128,64`` (or the flag repeated)."""

from __future__ import annotations

import argparse
import re
from typing import Any, Iterable, TypeVar

from pydantic_settings import CliSettingsSource

from ..arguments import Settings

S = TypeVar("S", bound=Settings)

# Short or historical spellings: ``-k`` for topk, ``--window`` for train-test's own warmup fraction.
SHORTCUTS = {"topk": "k", "warmup_fraction": "window"}
_DEFAULT_IN_HELP = re.compile(r"\(default: [^)]*\)$")


def _source(cls: type[Settings], parser: Any, shortcuts: dict | None, add_argument=argparse.ArgumentParser.add_argument):
    return CliSettingsSource(
        cls,
        root_parser=parser,
        add_argument_method=add_argument,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        cli_shortcuts=shortcuts,
    )


def add_settings(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type[Settings],
    *,
    only: Iterable[str] | None = None,
    defaults: Settings | None = None,
    shortcuts: Iterable[str] = (),
) -> None:
    """Add the flags of ``cls`` (only the fields ``only`` when given) to ``parser``; with ``defaults`` (an
    instance), its values are the defaults shown and used (the demo's recipe); ``shortcuts`` names the
    fields that also take their ``SHORTCUTS`` spelling."""
    wanted = None if only is None else set(only)

    def add_argument(target, *flags: str, **options: Any):
        dest = options.get("dest")
        if wanted is not None and dest not in wanted and _field_of(dest) not in wanted:
            return None
        if defaults is not None and _field_of(dest) in cls.model_fields:
            value = getattr(defaults, _field_of(dest))
            options["help"] = _DEFAULT_IN_HELP.sub(f"(default: {value})", options.get("help", ""))
            options["default"] = value
        return target.add_argument(*flags, **options)

    _source(cls, parser, _shortcuts_of(shortcuts), add_argument)


def settings_from(args: argparse.Namespace, cls: type[S], *, base: S | None = None, shortcuts: Iterable[str] = ()) -> S:
    """The settings of ``cls`` among the parsed flags; a field not given keeps ``base``'s value (or its
    default). Validation is the model's: a bad value is a ConfigurationError naming the field."""
    values = _source(cls, argparse.ArgumentParser(add_help=False), _shortcuts_of(shortcuts))(parsed_args=args)()
    return base.replace(**values) if base is not None else cls(**values)


def _shortcuts_of(fields: Iterable[str]) -> dict | None:
    """pydantic-settings keys shortcuts by the flag's name (kebab-case)."""
    return {name.replace("_", "-"): SHORTCUTS[name] for name in fields} or None


def _field_of(dest: str | None) -> str | None:
    return dest if dest is None else dest.replace("-", "_")
