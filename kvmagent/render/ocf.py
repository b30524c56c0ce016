"""The OCF resource agent ocf:kvmagent:guest, its decisions: which OCF exit
code each situation gets, from plain facts gathered by kvmagent.cli.ocf; and
its meta-data.  Pure.

The codes are the OCF standard's as Pacemaker documents them ("Pacemaker
Explained", OCF return codes); which situation gets which follows the
heartbeat VirtualDomain agent, the anchor for a guest under Pacemaker:

- a guest file missing is OCF_ERR_INSTALLED, except for a probe (monitor
  with interval 0: OCF_NOT_RUNNING, it cannot run here) and for stop
  (OCF_SUCCESS: nothing runs without it), as ocf_rarun does;
- a bad or missing parameter, or a guest file that does not validate, is
  OCF_ERR_CONFIGURED (fatal: Pacemaker stops the resource everywhere), and
  so is kvm@NAME enabled at boot: systemd would start a second copy of a
  guest that Pacemaker runs elsewhere;
- monitor: the guest's QEMU running in kvm-NAME.scope under kvm@NAME.service
  is OCF_SUCCESS, also while systemd restarts only the supervisor (the guest
  runs on): from the moment the supervisor ended in a way that the unit's
  Restart= restarts (its ExecStopPost= still running: measured ~80 ms of
  deactivating/stop-post after a SIGKILL, longer under load) until the new
  one runs; the unit stopped or failed with no QEMU left is OCF_NOT_RUNNING
  (cleanly stopped); anything in between (stopping, a QEMU without its
  unit) is OCF_ERR_GENERIC, so that Pacemaker stops it before it starts it
  anywhere else.
"""

from __future__ import annotations

import enum
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import NamedTuple
from xml.sax.saxutils import escape

from kvmagent.names import GUEST_NAME_RULE, valid_guest_name

AGENT = "ocf:kvmagent:guest"
VERSION = "1.0"


class Ocf(enum.IntEnum):
    """The OCF exit codes (OCF resource agent API, as Pacemaker uses them)."""

    SUCCESS = 0
    ERR_GENERIC = 1
    ERR_ARGS = 2
    ERR_UNIMPLEMENTED = 3
    ERR_PERM = 4
    ERR_INSTALLED = 5
    ERR_CONFIGURED = 6
    NOT_RUNNING = 7
    RUNNING_PROMOTED = 8  # promotable resources only: never returned by this agent
    FAILED_PROMOTED = 9  # idem


# Actions with their default timeouts and intervals, as meta-data advertises them.
# start: systemd's start of kvm@NAME ends once QEMU runs (not when the guest booted);
# stop: the guest's own stop timeout (kvmagent.toml's stop_timeout, 90 s by default)
# and the hard stop after it; migrate_to: a live move of the guest's RAM.
ACTIONS: dict[str, tuple[int, int | None]] = {
    "start": (120, None),
    "stop": (180, None),
    "monitor": (30, 10),
    "migrate_to": (600, None),
    "migrate_from": (120, None),
    "meta-data": (5, None),
    "validate-all": (30, None),
}
NEEDS_ROOT = frozenset({"start", "stop", "migrate_to", "migrate_from"})
RUNNING_SCOPE = frozenset({"active", "reloading"})
ENABLED = frozenset({"enabled", "enabled-runtime", "linked", "linked-runtime"})  # at boot


class Outcome(NamedTuple):
    """An action's exit code, and why (logged; Pacemaker shows a failure's as
    its exit reason)."""

    code: Ocf
    message: str


class Params(NamedTuple):
    """The resource's parameters (OCF_RESKEY_*) and Pacemaker's meta attributes."""

    name: str
    migration_user: str
    migration_network_suffix: str
    probe: bool  # a monitor with interval 0: is it running here?
    migrate_target: str  # migrate_to: the node it goes to
    timeout_ms: int  # this action's timeout, as Pacemaker set it (0: not given)


class UnitFacts(NamedTuple):
    """kvm@NAME.service and kvm-NAME.scope as systemd sees them."""

    service_state: str  # ActiveState: active, activating, deactivating, inactive, failed...
    service_sub: str  # SubState: running, auto-restart, stop-sigterm...
    scope_state: str  # kvm-NAME.scope's ActiveState: active while its QEMU runs
    enabled: str  # UnitFileState of kvm@NAME.service: enabled, disabled, static...
    result: str = ""  # Result: success, signal, exit-code... (why its main process ended)
    restart: str = ""  # Restart=: no, on-failure, on-abnormal, always...


# systemd.service(5), Restart=: which Result each setting restarts
RESTARTS = {
    "always": {"success", "exit-code", "signal", "core-dump", "timeout", "watchdog"},
    "on-success": {"success"},
    "on-failure": {"exit-code", "signal", "core-dump", "timeout", "watchdog"},
    "on-abnormal": {"signal", "core-dump", "timeout", "watchdog"},
    "on-abort": {"signal", "core-dump"},
    "on-watchdog": {"watchdog"},
}


def restarting(unit: UnitFacts) -> bool:
    """kvm@NAME.service is stopping because its supervisor ended, and
    systemd restarts it once its ExecStopPost= is done."""
    return (unit.service_state == "deactivating" and unit.service_sub in ("stop-post",
            "stop-sigterm", "final-sigterm") and unit.result in RESTARTS.get(unit.restart, ()))


class GuestFacts(NamedTuple):
    """The guest's file on this node."""

    file: str
    exists: bool
    problem: str | None  # why it does not validate (kvmagent's message), or None


def params(env: Mapping[str, str], action: str) -> Params | Outcome:
    """The parameters from the environment Pacemaker gives an agent, or
    OCF_ERR_CONFIGURED saying which is wrong."""
    name = env.get("OCF_RESKEY_name", "")
    if not name:
        return Outcome(Ocf.ERR_CONFIGURED, "parameter name is required (the guest's name: "
                       "/etc/kvmagent/guests/NAME.toml)")
    if not valid_guest_name(name):
        return Outcome(Ocf.ERR_CONFIGURED, f"parameter name={name!r} is not a guest name "
                       f"({GUEST_NAME_RULE})")
    user = env.get("OCF_RESKEY_migration_user", "")
    if user and not all(c.isalnum() or c in "-_." for c in user):
        return Outcome(Ocf.ERR_CONFIGURED, f"parameter migration_user={user!r} is not a "
                       "user name")
    suffix = env.get("OCF_RESKEY_migration_network_suffix", "")
    if suffix and not all(c.isalnum() or c in "-_." for c in suffix):
        return Outcome(Ocf.ERR_CONFIGURED, f"parameter migration_network_suffix={suffix!r}"
                       " is not part of a host name")
    interval = env.get("OCF_RESKEY_CRM_meta_interval", "0")
    timeout = env.get("OCF_RESKEY_CRM_meta_timeout", "0")
    return Params(name=name, migration_user=user, migration_network_suffix=suffix,
                  probe=action == "monitor" and interval in ("", "0"),
                  migrate_target=env.get("OCF_RESKEY_CRM_meta_migrate_target", ""),
                  timeout_ms=int(timeout) if timeout.isdigit() else 0)


def action_known(action: str | None) -> Outcome | None:
    """None for an action this agent has; else the usage error or OCF_ERR_UNIMPLEMENTED."""
    if action is None:
        return Outcome(Ocf.ERR_ARGS, usage())
    if action in ACTIONS or action in ("usage", "help"):
        return None
    return Outcome(Ocf.ERR_UNIMPLEMENTED, f"action {action!r} is not implemented; "
                   + usage())


def usage() -> str:
    return f"usage: guest {{{'|'.join(ACTIONS)}}} (an OCF resource agent, {AGENT})"


def missing_guest(action: str, p: Params, guest: GuestFacts) -> Outcome:
    """The guest's file is not on this node (ocf_rarun's rule for OCF_ERR_INSTALLED)."""
    if p.probe:
        return Outcome(Ocf.NOT_RUNNING, f"{guest.file} is not on this node: the guest "
                       "cannot run here")
    if action == "stop":
        return Outcome(Ocf.SUCCESS, f"{guest.file} is not on this node: nothing runs it "
                       "here, considered stopped")
    return Outcome(Ocf.ERR_INSTALLED, f"{guest.file} does not exist on this node (every "
                   "node that may run the guest needs the same guest file)")


def validate(action: str, p: Params, guest: GuestFacts, unit: UnitFacts,
             root: bool) -> Outcome | None:
    """What stops ACTION before it runs, or None.  Monitor and stop look at
    the file alone (a running guest is watched and stopped even if its file
    was broken meanwhile)."""
    if action in NEEDS_ROOT and not root:
        return Outcome(Ocf.ERR_PERM, f"{action} of a guest needs root")
    if not guest.exists:
        return missing_guest(action, p, guest)
    if action in ("monitor", "stop"):
        return None
    if guest.problem is not None:
        return Outcome(Ocf.ERR_CONFIGURED, guest.problem)
    if unit.enabled in ENABLED:
        return Outcome(Ocf.ERR_CONFIGURED, f"kvm@{p.name}.service is enabled: a guest under "
                       "Pacemaker must not be started by systemd at boot as well (run: "
                       f"systemctl disable kvm@{p.name}.service, on every node)")
    if action == "migrate_to" and not p.migrate_target:
        return Outcome(Ocf.ERR_ARGS, "migrate_to without a target node "
                       "(OCF_RESKEY_CRM_meta_migrate_target): run by Pacemaker only")
    return None


def monitor(name: str, unit: UnitFacts) -> Outcome:
    """Is the guest running here?  (See the module's docstring.)"""
    qemu = unit.scope_state in RUNNING_SCOPE
    svc = unit.service_state
    if svc in ("active", "reloading") and qemu:
        return Outcome(Ocf.SUCCESS, f"guest {name} runs (kvm@{name}.service {svc})")
    if (svc == "activating" or restarting(unit)) and qemu:
        return Outcome(Ocf.SUCCESS, f"guest {name} runs; its supervisor is being restarted "
                       f"(kvm@{name}.service {svc}/{unit.service_sub})")
    if not qemu and svc in ("inactive", "failed"):
        return Outcome(Ocf.NOT_RUNNING, f"guest {name} is not running (kvm@{name}.service "
                       f"{svc})")
    return Outcome(Ocf.ERR_GENERIC, f"guest {name} is neither running nor stopped: "
                   f"kvm@{name}.service {svc}/{unit.service_sub}, its QEMU's scope "
                   f"{unit.scope_state}")


def after_start(name: str, systemctl_rc: int, unit: UnitFacts) -> Outcome:
    found = monitor(name, unit)
    if found.code == Ocf.SUCCESS:
        return Outcome(Ocf.SUCCESS, f"guest {name} started")
    return Outcome(Ocf.ERR_GENERIC, f"start of kvm@{name}.service failed (systemctl exit "
                   f"{systemctl_rc}): {found.message}; see journalctl -u kvm@{name}.service")


def after_stop(name: str, systemctl_rc: int, unit: UnitFacts) -> Outcome:
    found = monitor(name, unit)
    if found.code == Ocf.NOT_RUNNING:
        return Outcome(Ocf.SUCCESS, f"guest {name} stopped")
    return Outcome(Ocf.ERR_GENERIC, f"stop of kvm@{name}.service failed (systemctl exit "
                   f"{systemctl_rc}): {found.message}")


PACEMAKER_UNITS = "pacemaker.service pacemaker_remote.service"


def pacemaker_dropin(name: str) -> tuple[str, str]:
    """The runtime drop-in (its path and text) that start and migrate_from
    give kvm@NAME.service; Pacemaker's own systemd: resources get one of the
    same name and order.

    Who restarts what: systemd still restarts a supervisor killed by a
    signal or its watchdog (on-abnormal), whose successor takes the running
    guest over, unseen by the guest and by Pacemaker; a QEMU that dies ends
    the unit failed (the supervisor's exit status 1) and systemd leaves it
    so: Pacemaker's monitor sees it, counts it and recovers it (here, or
    elsewhere past migration-threshold), and the two never restart the
    guest both.

    Who stops it at the node's shutdown: Pacemaker.  Before= makes the
    shutdown stop kvm@NAME only after pacemaker.service has stopped, and
    Pacemaker's stop first moves the guest away (migrate_to: the supervisor
    ends by itself, which also ends the unit's waiting stop job) or stops
    it (see stop_way)."""
    return (f"/run/systemd/system/kvm@{name}.service.d/50-pacemaker.conf",
            f"# Written by {AGENT}: at shutdown Pacemaker moves guest {name} away\n"
            "# (or stops it) before systemd would stop it; Pacemaker recovers it\n"
            "# when its QEMU dies, systemd restarts only its supervisor.\n"
            f"[Unit]\nBefore={PACEMAKER_UNITS}\n"
            "[Service]\nRestart=on-abnormal\n")


class StopWay(enum.Enum):
    """How the agent's stop ends kvm@NAME.service (stop_way)."""

    NOTHING = "nothing"  # it is not running: no job
    SYSTEMCTL = "systemctl"  # systemctl stop: a stop job, the unit's own timeouts
    SUPERVISOR = "supervisor"  # SIGTERM to the supervisor, whose exit ends the waiting job


def stop_waiting(list_jobs: str, unit: str) -> bool:
    """Whether `systemctl list-jobs --no-legend UNIT` shows a stop job of
    UNIT that waits (queued behind another job: at the node's shutdown,
    behind pacemaker.service's stop, which is this very agent's caller)."""
    return any(f[1:4] == [unit, "stop", "waiting"]
               for f in (line.split() for line in list_jobs.splitlines()) if len(f) >= 4)


def stop_way(unit: UnitFacts, stop_job_waits: bool) -> StopWay:
    """The agent's stop must never wait on a job queued behind Pacemaker's
    own stop: `systemctl stop` would join that job and wait for Pacemaker,
    which waits for this stop (a deadlock until the stop's timeout).  So a
    unit already inactive or failed gets no job at all (after migrate_to,
    Pacemaker stops the source, whose supervisor has ended by itself), and a
    running one whose stop job already waits is stopped through its
    supervisor (SIGTERM, as systemd's stop would send it: the guest's ACPI
    stop, then the hard stop); when the supervisor exits the unit is
    inactive and systemd ends the waiting job as done."""
    if unit.service_state in ("inactive", "failed"):
        return StopWay.NOTHING
    if stop_job_waits and unit.service_state in ("active", "reloading"):
        return StopWay.SUPERVISOR
    return StopWay.SYSTEMCTL


def migration_host(p: Params) -> str:
    """Where kvmagent migrate goes: [USER@]TARGET[SUFFIX] (the suffix names
    the node's address on a migration network, as VirtualDomain's
    migration_network_suffix does)."""
    host = p.migrate_target + p.migration_network_suffix
    return f"{p.migration_user}@{host}" if p.migration_user else host


def after_migrate_to(p: Params, migrate_rc: int, tail: str) -> Outcome:
    """kvmagent migrate's exit status as OCF's: any failure is OCF_ERR_GENERIC
    (not ERR_CONFIGURED or ERR_INSTALLED, which would ban the guest from
    every node: a refused move leaves it running here, and Pacemaker recovers
    by stopping and starting it)."""
    if migrate_rc == 0:
        return Outcome(Ocf.SUCCESS, f"guest {p.name} moved live to {p.migrate_target}")
    return Outcome(Ocf.ERR_GENERIC, f"kvmagent migrate {p.name} {migration_host(p)} failed "
                   f"(exit {migrate_rc}): {tail.strip()[-300:]}")


def after_migrate_from(name: str, source: str, unit: UnitFacts, incoming: bool) -> Outcome:
    """migrate_from: kvmagent migrate returned only once the guest ran here;
    this checks that it does, and no longer waits for a stream (INCOMING:
    the supervisor's incoming request is still there)."""
    found = monitor(name, unit)
    if found.code == Ocf.SUCCESS and not incoming:
        return Outcome(Ocf.SUCCESS, f"guest {name} arrived from {source or 'its source'} "
                       "and runs here")
    why = "still waiting for the migration stream" if found.code == Ocf.SUCCESS \
        else found.message
    return Outcome(Ocf.ERR_GENERIC, f"guest {name} is not running here after its move: {why}")


PARAMETERS = (
    ("name", True, True, "string", "", "the guest's name",
     "The guest: /etc/kvmagent/guests/NAME.toml, run as kvm@NAME.service on the node that "
     "runs the resource. The same guest file must be on every node, and kvm@NAME.service "
     "disabled on all of them (validate-all fails otherwise)."),
    ("migration_user", False, False, "string", "", "ssh user for live migration",
     "The user kvmagent migrate logs in as on the target node (default: ssh's own, "
     "root when Pacemaker runs the agent). Its keys must let each node reach the others "
     "without asking."),
    ("migration_network_suffix", False, False, "string", "", "migration network suffix",
     "Appended to the target node's name to make the host kvmagent migrate reaches, to "
     "send the migration over a dedicated network (e.g. \"-mig\": node2 -> node2-mig)."),
)


def meta_data() -> str:
    """The agent's meta-data XML (OCF resource agent API 1.0)."""
    params_xml = "".join(
        f'    <parameter name="{n}" unique="{int(unique)}" required="{int(req)}">\n'
        f'      <longdesc lang="en">{escape(long)}</longdesc>\n'
        f'      <shortdesc lang="en">{escape(short)}</shortdesc>\n'
        f'      <content type="{kind}" default="{escape(default)}"/>\n'
        f'    </parameter>\n'
        for n, req, unique, kind, default, short, long in PARAMETERS)
    actions_xml = "".join(
        f'    <action name="{a}" timeout="{t}s"'
        + (f' interval="{i}s" depth="0"' if i is not None else "") + "/>\n"
        for a, (t, i) in ACTIONS.items())
    return (
        '<?xml version="1.0"?>\n'
        '<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">\n'
        f'<resource-agent name="guest" version="{VERSION}">\n'
        '  <version>1.0</version>\n'
        '  <longdesc lang="en">A kvmagent guest as a Pacemaker resource: started and '
        'stopped as kvm@NAME.service (systemctl), watched through that unit and its '
        "QEMU's scope, moved live between nodes with kvmagent migrate (allow-migrate=true, "
        'over ssh). On whichever node runs it the guest is an ordinary kvmagent guest, '
        'seen with systemctl, journalctl, machinectl and kvmagent list.</longdesc>\n'
        '  <shortdesc lang="en">kvmagent guest (KVM/QEMU)</shortdesc>\n'
        '  <parameters>\n' + params_xml + '  </parameters>\n'
        '  <actions>\n' + actions_xml + '  </actions>\n'
        '</resource-agent>\n')


def cib_guests(cib_xml: str) -> set[str]:
    """The guests a Pacemaker CIB has as ocf:kvmagent:guest resources (their
    `name` parameter); none from a CIB that does not parse."""
    try:
        root = ET.fromstring(cib_xml)
    except ET.ParseError:
        return set()
    return {nv.get("value", "") for prim in root.iter("primitive")
            if (prim.get("class"), prim.get("provider"), prim.get("type"))
            == ("ocf", "kvmagent", "guest")
            for nv in prim.findall("instance_attributes/nvpair")
            if nv.get("name") == "name" and nv.get("value")}


def enabled_under_pacemaker(name: str, enabled: str) -> str | None:
    """`kvmagent validate --host`'s warning for a guest that this node's CIB
    runs as a resource while kvm@NAME.service is enabled (UnitFileState ENABLED)."""
    if enabled not in ENABLED:
        return None
    return (f"kvm@{name}.service is enabled, and Pacemaker runs guest {name} as a resource "
            f"({AGENT}): this node's next boot would start a second copy; run: "
            f"systemctl disable kvm@{name}.service")
