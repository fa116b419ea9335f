"""A ``review_queue`` materialisation that fails keeps the earlier queue on disk (outputs are published
whole, only on success), so the page must not serve that queue as current: the real Dagster job fails,
and the real `z0inf review serve` says the queue is out of date, naming the failed Dagster run; the next
successful materialisation clears it."""

from __future__ import annotations

import dagster as dg
import pytest
import requests

from z0inf_pipeline.review import RunLayout

from ...conftest import _stop
from ...defs.conftest import execute
from .conftest import start_server

ONLY_THE_QUEUE = [dg.AssetKey("review_queue")]


def _materialise_queue(instance, run_id: str, run_config: dict):
    from z0inf_pipeline.definitions import defs

    return defs.resolve_job_def("influence_job").execute_in_process(
        instance=instance, partition_key=run_id, run_config=run_config, raise_on_error=False,
        asset_selection=ONLY_THE_QUEUE,
    )


def test_a_failed_review_queue_run_leaves_its_old_queue_shown_as_out_of_date(analysed_run, fresh_data):
    layout = RunLayout.for_run(analysed_run.run_id, fresh_data)
    old_queue = layout.review_queue.read_bytes()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in analysed_run.env(fresh_data).items():
            patch.setenv(key, value)
        with dg.DagsterInstance.get() as instance:
            # another flag policy without the reviewer who changes it is refused: a real failure of the asset
            failed = _materialise_queue(instance, analysed_run.run_id,
                                        {"ops": {"review_queue": {"config": {"quantile": 0.5, "method": "quantile"}}}})
            assert not failed.success
            assert layout.review_queue.read_bytes() == old_queue  # the old queue is still there ...
            server = start_server(analysed_run, fresh_data)
            try:
                page = requests.get(f"{server.url}/runs/{analysed_run.run_id}", timeout=60)
                assert page.status_code == 200
                assert "out of date" in page.text and failed.run_id in page.text  # ... but not served as current

                rebuilt = _materialise_queue(instance, analysed_run.run_id, {})
                assert rebuilt.success
                assert not layout.review_queue_attempt.exists()
                again = requests.get(f"{server.url}/runs/{analysed_run.run_id}", timeout=60)
                assert again.status_code == 200 and "out of date" not in again.text
            finally:
                _stop(server.process)
