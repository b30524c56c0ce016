"""The plan that crosses the fork (kvmagent.render.plan): typed records made
by the planner (kvmagent.unit.startup.prepare), carried out by the
supervisor, which unpickles it with nothing but kvmagent.render.plan."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from kvmagent.config.model import Accel
from kvmagent.render.plan import CONSOLE_FD, QMP_FD, Disk, Plan, Tap, fill_in
from kvmagent.render.qemu import HostFacts
from kvmagent.unit import startup

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def plan(conf, monkeypatch: pytest.MonkeyPatch) -> Plan:  # type: ignore[no-untyped-def]
    conf.write("kvmagent.toml", 'qemu_user = "root"\n')
    conf.write("guests/g.toml", """\
        memory = "256M"
        on_poweroff = "keep"
        [stop]
        timeout = "30s"
        [[disk]]
        path = "/srv/g.img"
        [[disk]]
        path = "/srv/g.iso"
        media = "cdrom"
        bus = "ide"
        [[nic]]
        bridge = "br-kvm"
        mac = "52:54:00:12:34:56"
        """)
    monkeypatch.setattr(startup, "check_host",
                        lambda guest, host, *, lasting, state_dir: (HostFacts(Accel.TCG), []))
    made, fds = startup.prepare("g", conf.paths)
    assert fds == []
    return made


def test_the_plan_is_typed(plan: Plan) -> None:
    assert isinstance(plan, Plan)
    assert (plan.name, plan.memory_mib, plan.stop_timeout, plan.keep) == ("g", 256, 30.0, True)
    assert plan.taps == [Tap(nic=0, name=plan.taps[0].name, bridge="br-kvm", queues=1)]
    assert [type(d) for d in plan.disks] == [Disk, Disk]
    assert plan.disks[0].readonly is False and len(plan.disks[0].tokens) == 2
    assert plan.disks[1].readonly is True and len(plan.disks[1].tokens) == 1
    assert plan.qemu_user is None  # root
    assert plan.argv[1] == "-S" and plan.scope_unit == "kvm-g.scope"
    # every placeholder in the command line is one the supervisor fills in
    tokens = {QMP_FD, CONSOLE_FD, *(t for d in plan.disks for t in d.tokens)}
    tokens |= {f"\0tap{t.nic}\0" for t in plan.taps}
    filled = [fill_in(arg, {t: "3" for t in tokens}) for arg in plan.argv]
    assert not any("\0" in arg for arg in filled)


def test_unpickling_the_plan_imports_only_its_module(plan: Plan) -> None:
    """What the supervisor holds for the guest's lifetime: the plan's module
    (and its reader of JSON records) and its packages, nothing of the
    configuration machinery."""
    code = ("import sys, pickle; before = set(sys.modules); "
            "pickle.loads(sys.stdin.buffer.read()); "
            "print(' '.join(sorted(m for m in set(sys.modules) - before "
            "if m.startswith('kvmagent'))))")
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(plan), cwd=REPO,
                         capture_output=True, check=True).stdout.decode().split()
    assert out == ["kvmagent", "kvmagent.render", "kvmagent.render.plan",
                   "kvmagent.render.records"]
