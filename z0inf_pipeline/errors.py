"""The project's named errors: one base class, so every expected failure can be reported cleanly.

Pure Python (no MLflow, no Dagster): the core, the CLI and the Dagster layer all raise these.
Every message names the input (file, column, run, setting, URI) it is about.

    Z0infError
    ├── InputError            a file, table, tensor or argument is unusable
    │   ├── ContractError     an MLflow run breaks the run contract
    │   ├── ConfigurationError  a setting, YAML file, tracking URI or allow-list is wrong
    │   └── ReviewError       the review store or a review decision is unusable
    └── ServiceUnavailable    a service did not answer in time: retry later, nothing is wrong with the input
        └── MlflowUnavailable
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


class ServiceUnavailable(Z0infError):
    """A service did not answer within its time bound; the input may be fine, so retry later."""


class MlflowUnavailable(ServiceUnavailable):
    """The MLflow tracking store did not answer within its time bound."""
