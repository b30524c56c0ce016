"""The supervisor's event writers (kvmagent.unit.recorder): forked children, one
lingering through a stop; RECORDED_FILE only when every event was written,
so that ExecStopPost= records the end of the run itself otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmagent.host import state
from kvmagent.lifecycle import RECORDED_FILE
from kvmagent.paths import Paths
from kvmagent.unit.recorder import EventRecorder


@pytest.fixture
def paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Paths:
    monkeypatch.setenv("INVOCATION_ID", "inv1")
    p = Paths(config_dir=tmp_path / "etc", state_dir=tmp_path / "state",
              runtime_dir=tmp_path / "run")
    p.guest_runtime("g").mkdir(parents=True)
    return p


def _logged() -> tuple[list[str], object]:
    lines: list[str] = []
    return lines, lines.append


def test_lingering_writer_takes_the_events_of_a_stop(paths: Paths) -> None:
    lines, log = _logged()
    rec = EventRecorder("g", paths, log)
    rec("starting")
    rec("running", pid=123)
    rec.flush()
    rec("stopping", "admin", "stop --force")  # a detail: no systemctl asked
    rec.flush(linger=True)
    assert rec.lingering is not None
    rec("stopped", "admin", "stop --force")
    rec.finish()
    conn = state.connect(paths.state_dir)
    assert [e.event for e in state.events(conn)] == ["starting", "running", "stopping",
                                                     "stopped"]
    assert (paths.guest_runtime("g") / RECORDED_FILE).read_text() == "inv1"
    assert not lines and rec.child == 0 and rec.lingering is None


def test_a_failed_write_leaves_the_end_to_stop_post(paths: Paths) -> None:
    paths.state_dir.write_text("not a directory")  # every write fails
    lines, log = _logged()
    rec = EventRecorder("g", paths, log)
    rec("stopping", "admin", "stop --force")
    rec.flush(linger=True)
    rec("stopped", "admin", "stop --force")
    rec.finish()
    assert rec.failed
    assert not (paths.guest_runtime("g") / RECORDED_FILE).exists()
    assert any("stop-post records its end" in line for line in lines), lines


def test_a_writer_that_cannot_import_says_why(paths: Paths,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A supervisor started before an upgrade that moved kvmagent's modules:
    its writer's import fails, and the journal says so (never hidden by the
    child's os._exit); stop-post records the end."""
    import builtins
    real_import = builtins.__import__

    def moved(name: str, *args: object, **kw: object) -> object:
        if name == "kvmagent.host" or name.startswith("kvmagent.host."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kw)  # type: ignore[arg-type]

    said = paths.runtime_dir / "said"  # the writer is a child: its lines come through a file

    def log(text: str) -> None:
        with said.open("a") as f:
            f.write(text + "\n")

    rec = EventRecorder("g", paths, log)
    monkeypatch.setattr(builtins, "__import__", moved)
    rec("stopped", "admin", "stop --force")
    rec.flush()
    rec.finish()
    monkeypatch.undo()
    assert rec.failed
    assert not (paths.guest_runtime("g") / RECORDED_FILE).exists()
    lines = said.read_text().splitlines()
    assert lines[0] == ("cannot record guest g's events: ModuleNotFoundError: "
                        "No module named 'kvmagent.host'"), lines
    assert "stop-post records its end" in lines[1]


def test_a_lingering_writer_that_died_is_replaced(paths: Paths) -> None:
    import os
    import signal
    lines, log = _logged()
    rec = EventRecorder("g", paths, log)
    rec("stopping", "admin", "stop --force")
    rec.flush(linger=True)
    os.kill(rec.child, signal.SIGKILL)
    os.waitid(os.P_PID, rec.child, os.WEXITED | os.WNOWAIT)  # dead, not yet reaped
    rec("stopped", "admin", "stop --force")
    rec.finish()
    conn = state.connect(paths.state_dir)
    assert "stopped" in [e.event for e in state.events(conn)]
    assert rec.failed  # the "stopping" may be lost: stop-post checks the record
    assert not (paths.guest_runtime("g") / RECORDED_FILE).exists()


def test_a_run_that_ends_without_its_stop_leaves_the_end_to_stop_post(paths: Paths) -> None:
    """A supervisor that ends in an unexpected exception records no
    `stopped`: ExecStopPost= must still record the end of the run."""
    lines, log = _logged()
    rec = EventRecorder("g", paths, log)
    rec("starting")
    rec("running", pid=123)
    rec.finish()  # as the ExitStack does when an exception escapes
    conn = state.connect(paths.state_dir)
    assert [e.event for e in state.events(conn)] == ["starting", "running"]
    assert not rec.failed and not lines
    assert not (paths.guest_runtime("g") / RECORDED_FILE).exists()
