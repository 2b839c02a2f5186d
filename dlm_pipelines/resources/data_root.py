"""The local data root where the microscopes write: `<data root>/<system>/<local_path>`."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource

from dlm_pipelines.events import resolve_source


class DataRoot(ConfigurableResource):
    path: str

    @property
    def root(self) -> Path:
        return Path(self.path)

    def source(self, system: str, local_path: str) -> Path:
        """The event's source, checked to stay inside `<data root>/<system>/`."""
        return resolve_source(self.root, system, local_path)
