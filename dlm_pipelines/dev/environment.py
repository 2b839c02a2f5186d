"""Settings written as environment variables, so every child of the dev stack reads
exactly the settings the stack was given (`Settings()` in the child reads them back)."""

from __future__ import annotations

import json
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import AliasChoices, SecretStr
from pydantic_settings import NoDecode

if TYPE_CHECKING:
    from dlm_pipelines.settings import Settings


def env_name(name: str) -> str:
    from dlm_pipelines.settings import Settings

    alias = Settings.model_fields[name].validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return alias if isinstance(alias, str) else f"DLM_{name.upper()}"


def env_text(name: str, value: Any) -> str:
    """A setting's value written the way Settings reads it back from the environment."""
    from dlm_pipelines.settings import Settings

    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, list | tuple):
        if NoDecode in Settings.model_fields[name].metadata:
            return ",".join(str(v) for v in value)
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, timedelta):
        return str(value.total_seconds())
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def settings_env(settings: Settings) -> dict[str, str | None]:
    """Every explicitly set field as its environment variable (None: unset it)."""
    return {
        env_name(name): None if value is None else env_text(name, value)
        for name in sorted(settings.model_fields_set)
        for value in [getattr(settings, name)]
    }
