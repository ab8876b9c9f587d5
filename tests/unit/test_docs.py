"""The README stays true: every setting is documented with its default, make help matches."""

from __future__ import annotations

import subprocess
from pathlib import Path

from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_has_an_env_name_and_description():
    for name, field in Settings.model_fields.items():
        env, sep, meaning = (field.description or "").partition(": ")
        assert sep and meaning, f"{name}: description must read 'ENV_NAME: meaning'"
        assert env.lower() == name or name in ("google_cloud_project",), (
            f"{name}: env name {env} does not match"
        )


def test_readme_settings_table_is_current():
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from settings_table import settings_table

    readme = (ROOT / "README.md").read_text()
    assert settings_table() in readme, "run: python scripts/settings_table.py and paste it into README.md"


def test_readme_names_the_two_commands_and_make_help_lists_them():
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    help_text = subprocess.run(
        ["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    for target in ("install", "run", "demo", "test", "lint", "fmt", "bench", "bundle"):
        assert f"make {target}" in help_text
