"""The team code location: every step of a run in its own Kubernetes Job (``dagster-k8s``).

Load it with ``dagster code-server start -m z0inf_pipeline.deployments.k8s`` (or name the module in
the workspace of a Helm deployment); check it with ``dagster definitions validate -m
z0inf_pipeline.deployments.k8s``. Steps whose op carries the tag ``z0inf/resources: gpu`` ask for
one GPU and tolerate GPU nodes' taint; at most ``GPU_STEPS_PER_RUN`` of them run at once per run.
Every step pod gets the run pod's MLflow, review-store and data settings (``PASSED_ENV``), so all
steps read and write the same shared services.
"""

from __future__ import annotations

import os

import dagster as dg
from dagster_k8s import k8s_job_executor

from .. import definitions as local
from ..defs.resources import GPU_RESOURCE_TAG
from . import configured_executor, with_executor

# GPU steps of one run that may run at once (the executor's tag concurrency limit).
GPU_STEPS_PER_RUN = 1
# Environment variables copied from the run pod into every step pod (a bare name copies its value).
PASSED_ENV = [
    "MLFLOW_TRACKING_URI",
    "Z0INF_MLFLOW_CONFIG",
    "Z0INF_MLFLOW_SERVER",
    "Z0INF_REVIEW_STORE_URL",
    "Z0INF_DATA_DIR",
    "Z0INF_OUTPUTS_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_S3_ENDPOINT_URL",
]
GPU_STEP_K8S_CONFIG = {
    "container_config": {"resources": {"limits": {"nvidia.com/gpu": 1}}},
    "pod_spec_config": {
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
}


def gpu_steps(assets) -> list[str]:
    """Names of the ops tagged ``z0inf/resources: gpu``, inside graph-backed assets too (the loss-table
    shards); the executor matches per-step settings on op names."""
    return sorted(
        op.name
        for a in assets
        if isinstance(a, dg.AssetsDefinition)
        for op in a.node_def.iterate_op_defs()
        if op.tags.get(GPU_RESOURCE_TAG) == "gpu"
    )


def k8s_executor(assets, *, namespace: str, max_concurrent: int = 8) -> dg.ExecutorDefinition:
    """``k8s_job_executor`` configured for these assets: GPU limits on the tagged steps, shared settings
    passed to every step; the configuration checked when the definitions load."""
    config = {
        "job_namespace": namespace,
        "env_vars": PASSED_ENV,
        "max_concurrent": max_concurrent,
        "tag_concurrency_limits": [{"key": GPU_RESOURCE_TAG, "value": "gpu", "limit": GPU_STEPS_PER_RUN}],
        "per_step_k8s_config": {step: GPU_STEP_K8S_CONFIG for step in gpu_steps(assets)},
    }
    return configured_executor(k8s_job_executor, config, "z0inf_k8s_job_executor")


def k8s_definitions(base: dg.Definitions, *, namespace: str) -> dg.Definitions:
    """``base`` (assets, checks, jobs, sensors, resources) with the Kubernetes executor."""
    return with_executor(base, k8s_executor(base.assets or [], namespace=namespace))


defs = k8s_definitions(local.defs, namespace=os.environ.get("Z0INF_K8S_NAMESPACE", "dagster"))
