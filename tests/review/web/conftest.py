"""Fixtures for the review page: a real run (small real training, the real Dagster influence job),
the real `z0inf review serve` in a subprocess on a free port, and headless Debian Chromium driven
by selenium through /usr/bin/chromedriver."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from z0inf_pipeline.tracking import train_and_log

from ...conftest import _free_port, _stop
from ...defs.conftest import REPO_ROOT, TINY, execute

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# A hang guard, not an expectation: the start is awaited until the port accepts or the process exits.
SERVER_START_TIMEOUT_S = 600
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync", "--window-size=1400,1000",
)


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives headless Chromium (Debian chromium + chromium-driver)")


@dataclass
class PipelineRun:
    """One analysed contract run: its id, the data folder the pipeline wrote, the MLflow store, the instance."""

    run_id: str
    data_dir: Path
    tracking_uri: str
    dagster_home: Path

    def env(self, data_dir: Path | None = None) -> dict[str, str]:
        return {
            **os.environ,
            "Z0INF_DATA_DIR": str(data_dir or self.data_dir),
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "DAGSTER_HOME": str(self.dagster_home),
            "Z0INF_MLFLOW_CONFIG": "",
        }


@pytest.fixture(scope="package")
def analysed_run(tmp_path_factory) -> PipelineRun:
    """A real contract run (digits, 10% flipped labels) through the real influence_job: a review queue."""
    return _analysed(tmp_path_factory.mktemp("review-web"), lambda uri: train_and_log(TINY, tracking_uri=uri))


def _analysed(root: Path, train) -> PipelineRun:
    """A contract run made by ``train(tracking_uri)`` in its own MLflow store and Dagster instance
    under ``root``, through the real influence_job."""
    home = root / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    run = PipelineRun("", root / "data", f"sqlite:///{root / 'mlflow' / 'mlflow.db'}", home)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in run.env().items():
            patch.setenv(key, value)
        run.run_id = train(run.tracking_uri)
        with dg.DagsterInstance.get() as instance:
            assert execute(instance, "influence_job", run.run_id).success
    return run


@pytest.fixture(scope="package")
def analysed_lm_run(tmp_path_factory) -> PipelineRun:
    """A text run: the LM recipe, small (letter shift, 10% of the answers wrong), analysed."""
    from z0inf_pipeline.integrations.hf import train_and_log_lm
    from z0inf_pipeline.training.lm import LMRecipe

    recipe = LMRecipe(n_train=600, n_probe=80, checkpoints=6)  # the demo recipe at half size: it flags
    return _analysed(tmp_path_factory.mktemp("review-web-lm"), lambda uri: train_and_log_lm(recipe, tracking_uri=uri))


IRIS_LABEL = "species"


@pytest.fixture(scope="package")
def analysed_csv_run(tmp_path_factory) -> PipelineRun:
    """A tabular run from a user's CSV: iris (bundled with scikit-learn) with its feature names and its
    species as strings, 10% of the labels flipped, analysed."""
    from sklearn.datasets import load_iris

    from z0inf_pipeline.training import TrainConfig

    root = tmp_path_factory.mktemp("review-web-csv")
    iris = load_iris(as_frame=True)
    table = iris.data.assign(**{IRIS_LABEL: iris.target_names[iris.target]})
    table.to_csv(root / "iris.csv", index=False)
    config = TrainConfig(dataset=str(root / "iris.csv"), label_column=IRIS_LABEL, epochs=4, checkpoints=4,
                         hidden=(16,), label_noise=0.1, noise_seed=3)
    return _analysed(root, lambda uri: train_and_log(config, tracking_uri=uri))


@pytest.fixture
def fresh_data(analysed_run, tmp_path) -> Path:
    """A copy of the run's data folder with an empty review store, so every test decides from scratch."""
    data = tmp_path / "data"
    shutil.copytree(analysed_run.data_dir, data, ignore=shutil.ignore_patterns("review.db*"))
    return data


@dataclass
class Server:
    url: str
    data_dir: Path
    process: subprocess.Popen


def start_server(run: PipelineRun, data_dir: Path, *extra: str) -> Server:
    """`z0inf review serve` as a user starts it, on a free port; ready once the port accepts."""
    port = _free_port()
    log = (data_dir.parent / f"serve-{port}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "z0inf_pipeline.cli", "review", "serve", "--port", str(port), *extra],
        stdout=log, stderr=subprocess.STDOUT, env=run.env(data_dir), cwd=data_dir.parent, start_new_session=True,
    )
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return Server(f"http://127.0.0.1:{port}", data_dir, process)
        except OSError:
            time.sleep(0.2)
    _stop(process)
    pytest.fail(f"z0inf review serve did not start:\n{(data_dir.parent / f'serve-{port}.log').read_text()}")


@pytest.fixture
def server(analysed_run, fresh_data):
    served = start_server(analysed_run, fresh_data)
    yield served
    _stop(served.process)


@pytest.fixture(scope="package")
def browser():
    """Headless Chromium from Debian's packages, with a fresh profile."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="z0inf-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(180)  # the retrain button waits for two Dagster jobs
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser):
    """The browser with no cookies left from another test."""
    browser.delete_all_cookies()
    return browser
