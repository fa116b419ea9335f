"""Code locations for a team deployment: the same assets, checks, jobs and sensors as
``z0inf_pipeline.definitions`` (the local one), with an executor that scales past one machine."""

import dagster as dg


def configured_executor(executor: dg.ExecutorDefinition, config: dict, name: str) -> dg.ExecutorDefinition:
    """``executor`` configured with ``config``, the configuration checked now, when the definitions load
    (Dagster itself would only check it when a run starts), so ``dagster definitions validate`` catches
    a mistake."""
    configured = executor.configured(config, name=name)
    checked = configured.apply_config_mapping({})
    if not checked.success:
        raise dg.DagsterInvalidConfigError(f"{name}: invalid configuration", checked.errors, config)
    return configured


def with_executor(base: dg.Definitions, executor: dg.ExecutorDefinition) -> dg.Definitions:
    """``base`` (assets, checks, jobs, sensors, resources) run by ``executor``."""
    return dg.Definitions(
        assets=base.assets,
        asset_checks=base.asset_checks,
        jobs=base.jobs,
        sensors=base.sensors,
        schedules=base.schedules,
        resources=base.resources,
        executor=executor,
    )
