"""Code locations for a team deployment: the same assets, checks, jobs and sensors as
``z0inf_pipeline.definitions`` (the local one), with an executor that scales past one machine."""
