"""Dagster resources: the stores DLM talks to."""

from dlm_pipelines.resources.archive_queue import ArchiveQueue
from dlm_pipelines.resources.data_root import DataRoot
from dlm_pipelines.resources.object_store import ObjectStore
from dlm_pipelines.resources.redis_streams import RedisStreams

__all__ = ["ArchiveQueue", "DataRoot", "ObjectStore", "RedisStreams"]
