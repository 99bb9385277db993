"""Handing the service settings to a job process through its environment."""

from __future__ import annotations

import os

from app.settings import Settings

ENV_VAR = "FINETUNE_SETTINGS_JSON"


def settings_to_env(settings: Settings) -> dict[str, str]:
    return {ENV_VAR: settings.model_dump_json()}


def settings_from_env() -> Settings:
    raw = os.environ.get(ENV_VAR)
    return Settings.model_validate_json(raw) if raw else Settings()
