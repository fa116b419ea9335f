"""The base of every settings class: a frozen pydantic model, declared once per concept (kronfluence
style: ``GramArguments``, ``TrainTestArguments``, ``FlagPolicy``, ...).

One declaration serves three readers, none of which walks it by hand:

- Python: ``FlagPolicy(quantile=0.8)``, validated by pydantic (``Field`` constraints, ``Literal``
  choices, list coercion) and by the class's own ``model_validator`` for rules across fields;
- the Dagster launchpad: ``defs/config.py`` subclasses the model together with ``dg.Config`` (Dagster
  config *is* pydantic), so names, help (``description``), defaults and validation are the model's;
- the CLI: ``cli/arguments.py`` hands the model to pydantic-settings' ``CliSettingsSource``.

Write a new setting as ``name: type = Field(default, description="...", ge=...)``. Sequences are
``list[...]`` (Dagster config has no tuples); a field the launchpad and the CLI must not show belongs to a
subclass that only Python builds (``TrainConfig``'s curation fields). A bad value raises
``ConfigurationError`` naming the class and the field, wherever it came from.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigurationError, Z0infError


class Settings(BaseModel):
    """A frozen set of settings; a bad value is a ``ConfigurationError`` that names ``owner`` and the field."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # How error messages name the class ("flag policy"); set by each subclass.
    owner: ClassVar[str] = "settings"

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise _named_error(type(self).owner, exc) from None

    def replace(self, **changes: Any):
        """A copy with ``changes``, validated like a new instance (``model_copy`` would not validate)."""
        return type(self)(**{**dict(self), **changes})

    def to_dict(self) -> dict:
        """Plain data (lists, not tuples) for JSON, YAML, MLflow params and Dagster run config."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, values: dict):
        """Settings stored with ``to_dict`` (a run's train_config.json) read back; an unknown key is refused."""
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            raise ConfigurationError(f"{cls.owner}: unknown field(s) {unknown} (known: {sorted(cls.model_fields)})")
        return cls(**values)


def _named_error(owner: str, exc: ValidationError) -> ConfigurationError:
    """The first problem as one line, ``owner: field=value why``; a rule's own error passes through."""
    error = exc.errors()[0]
    raised = error.get("ctx", {}).get("error")
    if isinstance(raised, Z0infError):
        return raised
    field = ".".join(str(part) for part in error["loc"]) or "value"
    message = str(raised) if raised is not None else error["msg"]
    value = error.get("input")
    # a number given on the command line arrives as text: show it as the number it was meant to be
    shown = value if isinstance(value, str) and error["type"].startswith(_NUMERIC_ERRORS) else repr(value)
    return ConfigurationError(f"{owner}: {field}={shown} {message}")


_NUMERIC_ERRORS = ("greater_than", "less_than", "int_", "float_", "multiple_of", "finite_number")
