"""One definition per setting: a frozen dataclass per concept drives the Python API, the CLI flags
and (through ``defs/config.py``) the Dagster launchpad config.

Each field is declared once, kronfluence-style::

    neighbors: int = field(default=2, metadata={"help": "neighbouring checkpoints per checkpoint"})
    eta: Literal["uniform", "learning_rate"] = field(default="uniform", metadata={"help": "..."})
    model: str = field(default="mlp", metadata={"help": "...", "choices": MODEL_KINDS})

and validated in the dataclass's ``__post_init__`` (``check_choices`` does the choice fields), so a
bad value is refused with its field named wherever it came from. Metadata keys read here:

- ``help``: the text shown by ``--help`` and in the launchpad;
- ``choices``: allowed values of a ``str`` field (a ``Literal`` annotation gives them too);
- ``flags``: the option strings (default ``--field-name``), e.g. ``("-k", "--topk")``;
- ``metavar``: how ``--help`` names the value;
- ``python_only``: set from Python only (say, curation id lists), neither a flag nor launchpad config.

Supported annotations: bool, int, float, str, ``Literal[...]``, ``X | None`` and ``tuple[X, ...]``
of str or int (a list given for one becomes a tuple). This module is pure (argparse only); ``defs/config.py`` builds the
Dagster classes from the same ``setting_fields``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Union

from .errors import InputError

_NONE = type(None)


@dataclass(frozen=True)
class Setting:
    """One field of a settings dataclass, its annotation resolved and its metadata read."""

    name: str
    annotation: Any
    default: Any
    help: str
    choices: tuple | None
    optional: bool
    sequence_of: type | None  # element type of a ``tuple[X, ...]`` field, else None
    flags: tuple[str, ...]
    metavar: str | None

    @property
    def base(self) -> Any:
        """The annotation without ``| None``."""
        return _strip_optional(self.annotation)

    def coerce(self, value: Any) -> Any:
        """A value from the CLI or the launchpad (lists) as the dataclass declares it (tuples)."""
        if self.sequence_of is None or value is None:
            return value
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise InputError(f"{self.name}={value!r} must be a list of {self.sequence_of.__name__}")
        try:
            return tuple(self.sequence_of(v) for v in value)
        except (TypeError, ValueError):
            raise InputError(f"{self.name}={value!r} must be a list of {self.sequence_of.__name__}") from None


def setting_fields(cls: type, *, include: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> list[Setting]:
    """The settable fields of dataclass ``cls`` in declaration order (``python_only`` ones left out)."""
    settings = _settings_of(cls)
    wanted = None if include is None else set(include)
    unknown = (set(wanted or ()) | set(exclude)) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    return [s for s in settings if s.name not in exclude and (wanted is None or s.name in wanted)]


@functools.cache
def _settings_of(cls: type) -> tuple[Setting, ...]:
    """Every settable field of ``cls``, read once per class (``__post_init__`` asks on every instance)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    settings = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("python_only"):
            continue
        if f.default is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: a setting needs a default")
        annotation = hints[f.name]
        base = _strip_optional(annotation)
        choices = f.metadata.get("choices")
        if typing.get_origin(base) is Literal:
            choices = typing.get_args(base)
        settings.append(
            Setting(
                name=f.name,
                annotation=annotation,
                default=f.default,
                help=f.metadata.get("help", ""),
                choices=None if choices is None else tuple(choices),
                optional=base is not annotation,
                sequence_of=_sequence_element(base),
                flags=tuple(f.metadata.get("flags", (f"--{f.name.replace('_', '-')}",))),
                metavar=f.metadata.get("metavar"),
            )
        )
    return tuple(settings)


def check_choices(instance: Any, owner: str) -> None:
    """Refuse a value outside its field's choices, naming ``owner`` and the field; call from ``__post_init__``."""
    for setting in setting_fields(type(instance)):
        value = getattr(instance, setting.name)
        if setting.choices is not None and value not in setting.choices and not (setting.optional and value is None):
            raise InputError(f"{owner}: {setting.name}={value!r} must be one of {list(setting.choices)}")


def normalise_sequences(instance: Any) -> None:
    """Turn the values of tuple fields into tuples of their element type (works on frozen dataclasses),
    so ``TrainConfig(hidden=[64])`` compares and hashes like the default."""
    for setting in setting_fields(type(instance)):
        object.__setattr__(instance, setting.name, setting.coerce(getattr(instance, setting.name)))


def plain_values(instance: Any) -> dict:
    """The settable fields as plain data (tuples become lists): for JSON, YAML and Dagster run config."""
    return {s.name: _plain(getattr(instance, s.name)) for s in setting_fields(type(instance))}


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    defaults: Any = None,
) -> None:
    """Add one flag per setting of ``cls`` with its help, choices and default (from ``defaults``, an
    instance of ``cls``, when given: the demo shows the demo recipe's defaults)."""
    for setting in setting_fields(cls, include=include, exclude=exclude):
        default = setting.default if defaults is None else getattr(defaults, setting.name)
        options: dict[str, Any] = {"dest": setting.name, "default": default}
        options["help"] = f"{setting.help} ({_describe_default(default)})".lstrip().replace("%", "%%")
        if setting.base is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            if setting.sequence_of is not None:
                options.update(nargs="+", type=_comma_list(setting.sequence_of, setting.name), action=_Flatten)
            else:
                options["type"] = _scalar_type(setting)
            options.update(choices=setting.choices, metavar=setting.metavar)
        parser.add_argument(*setting.flags, **options)


def from_namespace(cls: type, namespace: argparse.Namespace, *, base: Any = None) -> Any:
    """An instance of ``cls`` from parsed flags: every setting the namespace holds, the rest from
    ``base`` (or the dataclass defaults). Validation is the dataclass's own."""
    values = {s.name: s.coerce(getattr(namespace, s.name)) for s in setting_fields(cls) if hasattr(namespace, s.name)}
    return dataclasses.replace(base, **values) if base is not None else cls(**values)


def _describe_default(default: Any) -> str:
    if default is None:
        return "default: none"
    if isinstance(default, bool):
        return f"default: {'on' if default else 'off'}"
    if isinstance(default, (tuple, list)):
        return f"default: {','.join(map(str, default))}"
    return f"default: {default}"


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not _NONE]
        if len(args) == 1:
            return args[0]
    return annotation


def _sequence_element(annotation: Any) -> type | None:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in (int, str):
        return args[0]
    if origin in (tuple, list):
        raise TypeError(f"unsupported setting type {annotation!r}: use tuple[int, ...] or tuple[str, ...]")
    return None


def _scalar_type(setting: Setting) -> type:
    base = setting.base
    if typing.get_origin(base) is Literal:
        return type(setting.choices[0])
    if base in (int, float, str):
        return base
    raise TypeError(f"setting {setting.name}: unsupported type {setting.annotation!r}")


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def _comma_list(element: type, name: str):
    """argparse type of one token of a sequence flag: ``--hidden 128,64`` and ``--hidden 128 64`` agree."""

    def parse(text: str) -> list:
        try:
            return [element(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: {text!r} is not a comma-separated list of {element.__name__}")

    return parse


class _Flatten(argparse.Action):
    """Joins the tokens of a sequence flag (each a comma-separated list) into one sequence."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [item for token in values for item in token])
