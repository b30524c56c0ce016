"""ocf:kvmagent:guest, the OCF resource agent Pacemaker runs
(/usr/lib/ocf/resource.d/kvmagent/guest, which calls main): the facts each
action needs, the commands it runs, and the exit code that the pure
kvmagent.render.ocf decides from them.

Every action is kvmagent's own: start and stop are `systemctl start|stop
kvm@NAME.service` (so the guest is an ordinary kvmagent guest on whichever
node runs it), monitor reads that unit's and its QEMU's scope's state,
migrate_to is `kvmagent migrate NAME [USER@]NODE` (live, over ssh; a failed
move leaves the guest running here), migrate_from checks that the guest
arrived.  A failure's reason goes to stderr as `ocf-exit-reason:TEXT`,
which Pacemaker shows with the failed action."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from kvmagent.config.guests import load_guest, load_host_config
from kvmagent.errors import KvmagentError
from kvmagent.names import scope_unit, service_unit
from kvmagent.paths import Paths
from kvmagent.render import ocf
from kvmagent.render.ocf import GuestFacts, Ocf, Outcome, Params, UnitFacts

ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
MARGIN = 5.0  # seconds kept from Pacemaker's timeout to report before it kills the agent
POLL = 0.5


def _run(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env=ENV, timeout=max(timeout, 1.0), check=False)


def _show(unit: str, props: Sequence[str]) -> dict[str, str]:
    out = _run(["systemctl", "show", unit, f"--property={','.join(props)}"], 30).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def unit_facts(name: str) -> UnitFacts:
    svc = _show(service_unit(name), ("ActiveState", "SubState", "UnitFileState", "Result",
                                     "Restart"))
    scope = _show(scope_unit(name), ("ActiveState",))
    return UnitFacts(service_state=svc.get("ActiveState", "unknown"),
                     service_sub=svc.get("SubState", "unknown"),
                     scope_state=scope.get("ActiveState", "unknown"),
                     enabled=svc.get("UnitFileState", ""), result=svc.get("Result", ""),
                     restart=svc.get("Restart", ""))


def guest_facts(paths: Paths, name: str) -> GuestFacts:
    file = paths.guest_config(name)
    if not file.exists():
        return GuestFacts(str(file), False, None)
    try:
        load_guest(paths, name, load_host_config(paths))
    except KvmagentError as e:
        return GuestFacts(str(file), True, str(e).replace("\n", ";"))
    return GuestFacts(str(file), True, None)


def _budget(p: Params, action: str) -> float:
    """Seconds this action may take: Pacemaker's timeout (or the default
    meta-data advertises) less a margin to report in."""
    ms = p.timeout_ms or ocf.ACTIONS[action][0] * 1000
    return max(ms / 1000 - MARGIN, 1.0)


def pacemaker_dropin(name: str) -> None:
    """kvm@NAME.service restarted by systemd only for its supervisor's sake,
    and stopped at shutdown only after Pacemaker
    (kvmagent.render.ocf.pacemaker_dropin); systemd reloaded if it changed."""
    path, text = ocf.pacemaker_dropin(name)
    file = Path(path)
    try:
        if file.read_text() == text and file.stat().st_mode & 0o777 == 0o644:
            return
    except OSError:
        pass
    file.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    tmp.write_text(text)
    # world-readable, as unit files are: under Pacemaker's umask (0077)
    # systemd warned of it at every load of the unit
    tmp.chmod(0o644)
    tmp.rename(file)
    _run(["systemctl", "daemon-reload"], 60)


def start(p: Params) -> Outcome:
    unit = service_unit(p.name)
    pacemaker_dropin(p.name)
    r = _run(["systemctl", "start", unit], _budget(p, "start"))
    return ocf.after_start(p.name, r.returncode, unit_facts(p.name))


def _stop_waits(unit: str) -> bool:
    jobs = _run(["systemctl", "list-jobs", "--no-legend", "--full", unit], 30).stdout
    return ocf.stop_waiting(jobs, unit)


def stop(p: Params) -> Outcome:
    """kvm@NAME stopped without ever waiting on a stop job queued behind
    pacemaker.service's own stop (kvmagent.render.ocf.stop_way)."""
    unit = service_unit(p.name)
    budget = _budget(p, "stop")
    deadline = time.monotonic() + budget
    facts = unit_facts(p.name)
    way = ocf.stop_way(facts, _stop_waits(unit))
    rc = 0
    if way is ocf.StopWay.SYSTEMCTL:
        rc = _run(["systemctl", "stop", unit], budget).returncode
    elif way is ocf.StopWay.SUPERVISOR:
        print(f"a stop job of {unit} waits behind another (as at the node's shutdown): "
              "its supervisor is told to stop the guest", file=sys.stderr)
        rc = _run(["systemctl", "kill", "--kill-whom=main", "--signal=SIGTERM", unit],
                  30).returncode
        while unit_facts(p.name).service_state not in ("inactive", "failed") and \
                time.monotonic() < deadline:
            time.sleep(POLL)
    facts = unit_facts(p.name)
    if facts.scope_state in ocf.RUNNING_SCOPE and facts.service_state in ("inactive", "failed"):
        # a QEMU left without its supervisor (it died past its restarts): only
        # its scope holds it now; signalled if its own stop job waits
        scope = scope_unit(p.name)
        if _stop_waits(scope):
            _run(["systemctl", "kill", "--signal=SIGTERM", scope], 30)
            while unit_facts(p.name).scope_state in ocf.RUNNING_SCOPE and \
                    time.monotonic() < deadline:
                time.sleep(POLL)
        else:
            _run(["systemctl", "stop", scope], deadline - time.monotonic())
        facts = unit_facts(p.name)
    return ocf.after_stop(p.name, rc, facts)


def migrate_to(p: Params) -> Outcome:
    r = _run(["kvmagent", "migrate", p.name, ocf.migration_host(p), "--json"],
             _budget(p, "migrate_to"))
    return ocf.after_migrate_to(p, r.returncode, r.stderr or r.stdout)


def migrate_from(p: Params, paths: Paths, source: str) -> Outcome:
    deadline = time.monotonic() + _budget(p, "migrate_from")
    while True:
        facts = unit_facts(p.name)
        found = ocf.after_migrate_from(p.name, source, facts,
                                       paths.incoming_request(p.name).exists())
        if found.code == Ocf.SUCCESS:
            pacemaker_dropin(p.name)  # the unit kvmagent migrate started here
            return found
        if time.monotonic() > deadline or \
                ocf.monitor(p.name, facts).code == Ocf.NOT_RUNNING:  # nothing is coming
            return found
        time.sleep(POLL)


def run(action: str, env: Mapping[str, str]) -> Outcome | str:
    """ACTION's outcome, or the text it prints (meta-data, usage)."""
    unknown = ocf.action_known(action)
    if unknown is not None:
        return unknown
    if action in ("usage", "help"):
        return ocf.usage() + "\n"
    if action == "meta-data":
        return ocf.meta_data()
    p = ocf.params(env, action)
    if isinstance(p, Outcome):
        return p
    paths = Paths.from_env(dict(env))
    guest, unit = guest_facts(paths, p.name), unit_facts(p.name)
    refused = ocf.validate(action, p, guest, unit, os.geteuid() == 0)
    if refused is not None:
        return refused
    if action == "monitor":
        return ocf.monitor(p.name, unit)
    if action == "validate-all":
        return Outcome(Ocf.SUCCESS, f"{guest.file} validates; kvm@{p.name}.service is "
                       f"{unit.enabled or 'not enabled'}")
    if action == "start":
        return start(p)
    if action == "stop":
        return stop(p)
    if action == "migrate_to":
        return migrate_to(p)
    return migrate_from(p, paths, env.get("OCF_RESKEY_CRM_meta_migrate_source", ""))


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    action = args[0] if args else None
    try:
        result = run(action, os.environ if env is None else env) if action is not None \
            else ocf.action_known(None)
    except subprocess.TimeoutExpired as e:
        result = Outcome(Ocf.ERR_GENERIC, f"{action}: {' '.join(map(str, e.cmd))} took longer "
                         f"than {e.timeout:.0f} s")
    except FileNotFoundError as e:
        result = Outcome(Ocf.ERR_INSTALLED, f"{action}: {e.filename} is not installed")
    assert result is not None
    if isinstance(result, str):
        sys.stdout.write(result)
        return int(Ocf.SUCCESS)
    code, message = result
    if code not in (Ocf.SUCCESS, Ocf.NOT_RUNNING):
        print(f"ocf-exit-reason:{message}", file=sys.stderr)
    elif action != "monitor":  # a monitor that finds what it expects says nothing
        print(message, file=sys.stderr)
    return int(code)
