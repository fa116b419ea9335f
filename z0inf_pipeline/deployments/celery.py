"""The team code location on Celery: every step of a run is a task on a Redis queue, run by
``dagster-celery`` workers on any machine that shares the Dagster instance and the outputs folder.

Load it with ``dagster code-server start -m z0inf_pipeline.deployments.celery`` (or ``dagster dev -m``);
start workers with ``deployment/celery.yaml`` (docs/deployment.md). Steps whose op carries the tag
``z0inf/resources: gpu`` (the influence steps, one loss-table shard each) go to the ``gpu`` queue,
so GPU machines run them (one worker per GPU) and others run the rest from the ``dagster`` queue.

A task is acknowledged only when its step has finished (``task_acks_late``): when the process running
a step dies, Celery puts the task back at once (``task_reject_on_worker_lost``); when a whole worker
machine dies, Redis hands its task to another worker after ``visibility_timeout_s``, which must
therefore exceed the longest step. A run whose broker is down fails at once with
``CeleryBrokerUnavailable`` instead of waiting on a queue nobody can reach.
"""

from __future__ import annotations

import os

import dagster as dg
from dagster_celery import celery_executor
from dagster_celery.executor import CELERY_CONFIG, CeleryExecutor

from .. import definitions as local
from ..errors import CeleryBrokerUnavailable
from . import configured_executor, with_executor

BROKER_ENV = "Z0INF_CELERY_BROKER"
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
VISIBILITY_TIMEOUT_ENV = "Z0INF_CELERY_VISIBILITY_TIMEOUT_S"
# Seconds a worker may hold an unfinished task before Redis gives it to another worker.
VISIBILITY_TIMEOUT_S = 6 * 3600
# Seconds the lock of one sweep for dead workers' tasks outlives a worker that died during the sweep
# (kombu's default, 300 s, would hold back every redelivery for 5 minutes); a sweep takes milliseconds.
SWEEP_LOCK_EXPIRY_S = 30
BROKER_PROBE_TIMEOUT_S = 5.0


def celery_settings(broker: str, *, visibility_timeout_s: float = VISIBILITY_TIMEOUT_S) -> dict:
    """The executor's configuration, which the workers must share (``deployment/celery.yaml`` is this,
    with the broker read from ``$Z0INF_CELERY_BROKER``): Redis as broker and result store, late acks."""
    return {
        "broker": broker,
        "backend": broker,
        "config_source": {
            "task_acks_late": True,
            "task_reject_on_worker_lost": True,
            "worker_prefetch_multiplier": 1,
            "broker_connection_retry_on_startup": True,
            "broker_transport_options": {
                "visibility_timeout": visibility_timeout_s,
                # look for tasks of dead workers every few seconds, not every 100 s
                "unacked_restore_interval": 2,
                "unacked_restore_throttle": 1,
                "unacked_mutex_expire": SWEEP_LOCK_EXPIRY_S,
                # a broker that is down fails a submission within seconds
                "max_retries": 3,
                "interval_start": 0,
                "interval_step": 0.2,
                "interval_max": 0.5,
            },
        },
    }


def check_broker(url: str, timeout_s: float = BROKER_PROBE_TIMEOUT_S) -> None:
    """Raise CeleryBrokerUnavailable unless the broker accepts a connection within ``timeout_s``."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=timeout_s, transport_options={"socket_timeout": timeout_s}) as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout_s)
    except Exception as exc:  # kombu raises the transport's own errors (OperationalError, OSError, ...)
        raise CeleryBrokerUnavailable(
            f"Celery broker {url} did not accept a connection within {timeout_s:g} s ({exc}); start Redis "
            f"(redis-server) or point ${BROKER_ENV} at it"
        ) from None


def worker_command(config_yaml: str, name: str, queues: str = "dagster,gpu") -> list[str]:
    """``dagster-celery worker start`` for one worker named ``name`` that runs one task at a time (one
    per GPU) from ``queues``, given once with commas: Celery keeps only the last of several ``-q``."""
    return ["dagster-celery", "worker", "start", "-A", "dagster_celery.app", "-y", config_yaml, "-q", queues,
            "-n", name, "--", "--concurrency=1", "--pool=prefork"]


class CheckedCeleryExecutor(CeleryExecutor):
    """dagster-celery's executor that first checks the broker: otherwise a run would fail only after
    Celery's retries, with a traceback from deep inside kombu."""

    def execute(self, plan_context, execution_plan):
        check_broker(self.broker)
        yield from super().execute(plan_context, execution_plan)


@dg.executor(name="z0inf_celery", config_schema=CELERY_CONFIG, requirements=dg.multiple_process_executor_requirements())
def checked_celery_executor(init_context) -> CheckedCeleryExecutor:
    base = celery_executor.executor_creation_fn(init_context)
    return CheckedCeleryExecutor(
        retries=base.retries,
        broker=base.broker,
        backend=base.backend,
        include=base.include,
        config_source=base.config_source.__dict__,
    )


def celery_definitions(base: dg.Definitions, settings: dict) -> dg.Definitions:
    """``base`` (assets, checks, jobs, sensors, resources) with the checked Celery executor configured
    with ``settings``."""
    return with_executor(base, configured_executor(checked_celery_executor, settings, "z0inf_celery_executor"))


defs = celery_definitions(
    local.defs,
    celery_settings(
        os.environ.get(BROKER_ENV, DEFAULT_BROKER),
        visibility_timeout_s=float(os.environ.get(VISIBILITY_TIMEOUT_ENV, VISIBILITY_TIMEOUT_S)),
    ),
)
