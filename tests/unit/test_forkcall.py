import json
import os

import pytest

from kvmagent.unit import forkcall
from kvmagent.errors import ExitStatus, KvmagentError, host_error


def _opens(path):
    import json  # a module imported only here must not leak into the parent's state
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    return json.dumps({"pid": os.getpid()}), [fd]


def _fails():
    raise host_error("no such bridge", "create it")


def _crashes():
    raise ZeroDivisionError("boom")


def test_value_and_fds_come_back(tmp_path):
    f = tmp_path / "x"
    f.write_text("hello")
    value, fds = forkcall.call(_opens, str(f))
    assert json.loads(value)["pid"] != os.getpid()  # the child's, not ours
    assert len(fds) == 1 and os.read(fds[0], 5) == b"hello"
    os.close(fds[0])


def test_kvmagent_error_is_raised_again():
    with pytest.raises(KvmagentError) as exc:
        forkcall.call(_fails)
    assert exc.value.message == "no such bridge" and exc.value.hint == "create it"
    assert exc.value.status == ExitStatus.HOST_NOT_READY


def test_crash_becomes_an_error():
    with pytest.raises(KvmagentError) as exc:
        forkcall.call(_crashes)
    assert "ZeroDivisionError: boom" in exc.value.message


def _sleeps():
    import time
    time.sleep(5)
    return None, []


def _imported(module):
    import sys
    return module in sys.modules, []


def test_timeout():
    with pytest.raises(KvmagentError, match="did not finish"):
        forkcall.call(_sleeps, timeout=0.2)


def test_preloaded_child_and_a_dismissed_one():
    import sys
    assert "wave" not in sys.modules
    child = forkcall.Child(preload=("wave",))
    assert child.call(_imported, "wave") == (True, [])
    assert "wave" not in sys.modules  # imported in the child only
    unused = forkcall.Child(preload=("wave",))
    unused.close()  # exits without a call; reaped
    assert unused.pid == 0


def test_failed_preload_is_reported():
    with pytest.raises(KvmagentError, match="No module named 'no_such_module'"):
        forkcall.Child(preload=("no_such_module",)).call(_imported, "x")


def test_a_fork_that_fails_is_a_kvmagent_error(monkeypatch) -> None:
    import os

    from kvmagent.unit import forkcall
    from kvmagent.errors import KvmagentError

    def no_fork() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")
    monkeypatch.setattr(os, "fork", no_fork)
    with pytest.raises(KvmagentError, match="cannot start a helper process"):
        forkcall.Child()


def _naps():
    import time
    time.sleep(0.5)
    return "rested", []


def test_done_waits_for_the_answer_at_most_so_long():
    child = forkcall.Child()
    child.submit(_naps)
    assert not child.done(0.05)  # still asleep
    assert child.done(5)
    assert child.result(timeout=0) == ("rested", [])
