"""kvmagent.unit.testhook: off unless KVMAGENT_TEST_HOOKS=1, and then only at
the point its file names; the file is used once."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmagent.unit import testhook


def test_off_a_hook_file_does_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(testhook, "ACTIVE", False)
    (tmp_path / testhook.HOOK_FILE).write_text("running raise\n")
    testhook.point(str(tmp_path), "running")
    assert (tmp_path / testhook.HOOK_FILE).exists()


def test_on_it_raises_at_its_point_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(testhook, "ACTIVE", True)
    testhook.point(str(tmp_path), "running")  # no file: nothing
    (tmp_path / testhook.HOOK_FILE).write_text("stopping raise\n")
    testhook.point(str(tmp_path), "running")  # another point: nothing
    with pytest.raises(testhook.InjectedFailure, match="at stopping"):
        testhook.point(str(tmp_path), "stopping")
    assert not (tmp_path / testhook.HOOK_FILE).exists()
    testhook.point(str(tmp_path), "stopping")  # used once


def test_the_package_never_turns_it_on() -> None:
    """Only the system tests' drop-in sets the variable, never a shipped file."""
    repo = Path(__file__).resolve().parents[2]
    shipped = [*repo.glob("units/*"), *repo.glob("debian/*"), *repo.glob("kvmagent/**/*.py")]
    assert [p for p in shipped if p.is_file() and p.name != "testhook.py"
            and "KVMAGENT_TEST_HOOKS" in p.read_text(errors="replace")] == []
