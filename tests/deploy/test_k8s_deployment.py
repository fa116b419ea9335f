"""The team code location: the same graph as the local one, with the Kubernetes job executor,
its configuration checked by ``dagster definitions validate`` (no cluster is needed to check it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from z0inf_pipeline import definitions as local
from z0inf_pipeline.deployments import k8s

REPO_ROOT = Path(__file__).resolve().parents[2]


def _validate(module: str, tmp_path: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    paths = [str(REPO_ROOT), *([str(extra_path)] if extra_path else []), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    dagster = Path(sys.executable).with_name("dagster")
    return subprocess.run([str(dagster), "definitions", "validate", "-m", module], capture_output=True, text=True,
                          env=env, timeout=300)


def test_the_k8s_code_location_validates(tmp_path):
    result = _validate("z0inf_pipeline.deployments.k8s", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Validation successful for code location z0inf_pipeline.deployments.k8s" in result.stdout + result.stderr


def test_validate_refuses_a_bad_executor_configuration(tmp_path):
    """The check above means something: a wrong executor setting fails the same command, naming it."""
    module = tmp_path / "broken_location.py"
    module.write_text(
        "from z0inf_pipeline import definitions as local\n"
        "from z0inf_pipeline.deployments import k8s\n"
        "defs = k8s.k8s_definitions(local.defs, namespace=['not', 'a', 'name'])\n"
    )
    result = _validate("broken_location", tmp_path, extra_path=tmp_path)
    assert result.returncode == 1
    assert "job_namespace" in result.stdout + result.stderr


def test_same_graph_as_the_local_location_on_the_k8s_executor():
    assert k8s.defs.executor.name == "z0inf_k8s_job_executor"
    assert k8s.defs.resolve_asset_graph().get_all_asset_keys() == local.defs.resolve_asset_graph().get_all_asset_keys()
    assert {j.name for j in k8s.defs.resolve_all_job_defs()} == {j.name for j in local.defs.resolve_all_job_defs()}
    assert set(k8s.defs.resources) == set(local.defs.resources)
    assert k8s.defs.sensors == local.defs.sensors


def test_gpu_tagged_steps_get_a_gpu_and_a_concurrency_limit():
    @dg.asset(op_tags={k8s.GPU_RESOURCE_TAG: "gpu"})
    def on_gpu() -> int:
        return 1

    @dg.asset
    def on_cpu() -> int:
        return 2

    executor = k8s.k8s_executor([on_gpu, on_cpu], namespace="team")
    config = executor.apply_config_mapping({}).value["config"]  # what a run's executor is created with
    assert config["job_namespace"] == "team"
    assert set(config["per_step_k8s_config"]) == {"on_gpu"}
    on_gpu_config = config["per_step_k8s_config"]["on_gpu"]  # with Dagster's defaults for the rest
    assert on_gpu_config["container_config"] == {"resources": {"limits": {"nvidia.com/gpu": 1}}}
    assert on_gpu_config["pod_spec_config"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert config["tag_concurrency_limits"] == [{"key": "z0inf/resources", "value": "gpu", "limit": 1}]
    assert "Z0INF_REVIEW_STORE_URL" in config["env_vars"] and "MLFLOW_TRACKING_URI" in config["env_vars"]
    # the project's own graph: whatever its influence steps are tagged with reaches the executor
    assert k8s.gpu_steps(local.defs.assets) == [
        "assemble_train_test_influence", "compute_loss_shard", "compute_projection_shard", "self_influence",
        "weight_gram",
    ]
