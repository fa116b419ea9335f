"""The project's named errors: one base class, so every expected failure can be reported cleanly.

Pure Python (no MLflow, no Dagster): the core, the CLI and the Dagster layer all raise these.
Every message names the input (file, column, run, setting, URI) it is about.

    Z0infError
    ├── InputError            a file, table, tensor or argument is unusable
    │   ├── ContractError     an MLflow run breaks the run contract
    │   ├── ConfigurationError  a setting, YAML file, tracking URI or allow-list is wrong
    │   └── ReviewError       the review store or a review decision is unusable
    ├── StorageError          a folder or store cannot take a write (disk full, read-only, gone)
    └── ServiceUnavailable    a service did not answer in time: retry later, nothing is wrong with the input
        ├── MlflowUnavailable
        └── CeleryBrokerUnavailable
"""

from __future__ import annotations


class Z0infError(Exception):
    """Base of every expected failure; the CLI turns it into ``z0inf: error: ...`` and exit status 2."""


class InputError(Z0infError, ValueError):
    """An input (file, column, tensor, argument) is unusable; the message names it."""


class ContractError(InputError):
    """An MLflow run does not satisfy the run contract; the message names the run and the artifact or field."""


class ConfigurationError(InputError):
    """A setting (training recipe, YAML file, tracking URI, allow-list, environment variable) is invalid."""


class ReviewError(InputError):
    """The review store cannot be used (unreadable, not a database) or a review decision is invalid."""


class StorageError(Z0infError):
    """A folder or store cannot take a write (the disk is full, it is read-only, it is gone): nothing is
    wrong with the input; the message names the folder or store and what to free or fix."""


class ServiceUnavailable(Z0infError):
    """A service did not answer within its time bound; the input may be fine, so retry later."""


class MlflowUnavailable(ServiceUnavailable):
    """The MLflow tracking store did not answer within its time bound."""


class CeleryBrokerUnavailable(ServiceUnavailable):
    """The Celery broker (Redis) of the celery code location did not answer when a run started."""


def named_error(class_name: str, message: str, *, where: str = "") -> Z0infError | None:
    """Rebuild a named error from its class name and message (as Dagster records a failed step's cause),
    so a command can report it like any other; None when ``class_name`` is not one of these classes.
    A leading ``module.Class: `` (how Python formats an exception) is dropped from the message, and
    ``where`` (say, the failed step) is put in front of it."""
    cls = globals().get(class_name)
    if not (isinstance(cls, type) and issubclass(cls, Z0infError)):
        return None
    for prefix in (f"{cls.__module__}.{class_name}: ", f"{class_name}: "):
        message = message.removeprefix(prefix)
    return cls(f"{where}{message}")
