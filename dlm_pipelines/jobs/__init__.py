"""Dagster jobs and their schedules."""

from dlm_pipelines.jobs.purge import build_purge_job, build_purge_schedule

__all__ = ["build_purge_job", "build_purge_schedule"]
