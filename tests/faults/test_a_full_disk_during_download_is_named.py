"""A full disk while a run's artifacts download is a StorageError naming the folder, not MLflow's
"please ensure that the path is correct". The OSError is real: a write to /dev/full fails with ENOSPC
(no small file system can be mounted here to fill up for real)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from z0inf_pipeline.errors import ContractError, StorageError
from z0inf_pipeline.tracking.reader import download_failure

DEV_FULL = Path("/dev/full")


def _enospc() -> OSError:
    if not DEV_FULL.exists():
        pytest.skip("needs /dev/full")
    try:
        with DEV_FULL.open("wb", buffering=0) as full:
            full.write(b"x" * 4096)
    except OSError as exc:
        return exc
    pytest.fail("a write to /dev/full did not fail")


def test_a_full_disk_during_an_artifact_download_names_the_folder(tmp_path):
    exc = _enospc()
    assert exc.errno == errno.ENOSPC
    error = download_failure("abc123", "checkpoints/step_00000010.safetensors", tmp_path, exc)
    assert isinstance(error, StorageError) and not isinstance(error, ContractError)
    assert "is full" in str(error) and str(tmp_path) in str(error) and "step_00000010" in str(error)
    # MLflow's message for the same failure, with the OSError text in it
    reported = MlflowException(f"The following failures occurred while downloading: {exc}")
    assert isinstance(download_failure("abc123", "x", tmp_path, reported), StorageError)


def test_other_download_failures_stay_contract_errors(tmp_path):
    missing = MlflowException("Failed to download artifacts from path 'x', please ensure that the path is correct.")
    error = download_failure("abc123", "x", tmp_path, missing)  # tmp_path has room: not a full disk
    assert isinstance(error, ContractError) and "cannot be downloaded" in str(error)
    denied = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x"))
    assert isinstance(download_failure("abc123", "x", tmp_path, denied), ContractError)
