"""Settings: comma lists read as typed tuples; production rules checked on the whole object."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.settings import Settings, get_settings, reset_settings_cache


def test_comma_lists_become_checked_tuples_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("STORAGE_FALLBACK", " r2, cf_images,,r2 ")
    monkeypatch.setenv("RUNNER_ENVIRONMENTS", "comm")

    settings = Settings(data_dir=tmp_path)

    assert settings.storage_fallback == ("r2", "cf_images")
    assert settings.fallback_providers == ["r2", "cf_images"]
    assert settings.runner_environments == ("comm",) and settings.environments == ["comm"]


def test_an_unknown_provider_is_refused_naming_the_allowed_ones(tmp_path):
    with pytest.raises(ValidationError) as raised:
        Settings(data_dir=tmp_path, storage_fallback="local,s3")

    error = raised.value.errors()[0]
    assert error["loc"] == ("storage_fallback", 1)
    assert all(name in error["msg"] for name in ("local", "gcs", "r2", "cf_images"))


def test_no_environment_is_refused(tmp_path):
    with pytest.raises(ValidationError) as raised:
        Settings(data_dir=tmp_path, runner_environments=" , ")

    assert raised.value.errors()[0]["loc"] == ("runner_environments",)


def test_production_names_every_missing_safeguard_at_once(tmp_path):
    with pytest.raises(ValidationError) as raised:
        Settings(data_dir=tmp_path, app_env="production", fetch_allow_loopback=True)

    message = str(raised.value)
    for variable in ("FETCH_ALLOW_LOOPBACK", "API_KEYS", "WEBHOOK_SECRET"):
        assert variable in message


def test_production_rules_hold_whatever_order_the_values_come_in(tmp_path):
    """The rules read the finished object, so a value set before or after APP_ENV is the same."""
    secured = {"api_keys_file": tmp_path / "keys", "webhook_secret": "whsec_c2VjcmV0"}

    settings = Settings(**secured, app_env="production", data_dir=tmp_path)
    assert settings.app_env == "production"
    with pytest.raises(ValidationError):
        Settings(fetch_allow_loopback=True, **secured, data_dir=tmp_path, app_env="production")


def test_a_bad_value_stops_the_process_naming_the_variable(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.setenv("APP_ENV", "production")
    monkeypatch.setenv("FETCH_ALLOW_LOOPBACK", "true")
    reset_settings_cache()

    with pytest.raises(SystemExit):
        get_settings()

    assert "FETCH_ALLOW_LOOPBACK" in capsys.readouterr().err
