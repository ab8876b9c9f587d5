"""benchmarks.run: a part that raises is a FAILED figure and ``make bench`` exits 1.

Figures 2 and 7 printed "not measured: TypeError ..." for a day (a product change left the
task's started_at empty for short jobs; the store's create gained a keyword the
benchmark's wrapper did not pass) and the run still exited 0, so nobody saw them go.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import run
from benchmarks.common import Row, not_measured


@pytest.fixture
def latest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "latest.md"
    monkeypatch.setattr(run, "LATEST", path)
    return path


def test_a_part_that_raises_is_a_failed_figure_and_the_run_exits_1(
    latest: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(workdir: Path) -> list[Row]:
        raise TypeError("create() got an unexpected keyword argument 'serialized'")

    monkeypatch.setattr(run, "_cold_start", broken)

    assert run.main(["--only", "4"]) == 1

    out, err = capsys.readouterr()
    message = "create() got an unexpected keyword argument 'serialized'"
    assert f"| 4. cold start | failed: TypeError: {message} |" in out
    assert "| FAILED |" in out
    assert "Traceback" in err and "in broken" in err
    assert "FAILED" in latest.read_text()


def test_a_part_that_lacks_a_dependency_is_not_measured_and_the_run_exits_0(
    latest: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def unavailable(workdir: Path) -> list[Row]:
        return [not_measured("4. cold start", "no emulator here")]

    monkeypatch.setattr(run, "_cold_start", unavailable)

    assert run.main(["--only", "4"]) == 0
    assert "not measured: no emulator here" in capsys.readouterr().out
