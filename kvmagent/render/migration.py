"""Live migration's decisions (`kvmagent migrate`), pure: whether a guest may
move (preflight, from plain data gathered on both hosts: SideFacts), what
the command does next while the migration runs (source_step), what the
destination's supervisor does while QEMU receives it (incoming_step), and
the progress line.  kvmagent.cli.migrate and kvmagent.unit.migration carry
the decisions out; nothing here touches a host."""

from __future__ import annotations

import enum
import json
import re
from typing import Any, NamedTuple

from kvmagent.errors import ExitStatus
from kvmagent.render.records import read

# The source QEMU's -machine and -cpu values, as the destination's command
# line takes them: no option of QEMU's own can hide in them.
MACHINE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
CPU_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.,+=-]*")
# Once the source's QEMU says "completed", how long the destination has to
# say that the guest runs there before the source asks it anew (settle_step).
CONFIRM_TIMEOUT = 10.0
# How long the source asks the destination, over new ssh sessions, whether
# the guest runs there, before it leaves the guest paused here (HOLD).
SETTLE_LIMIT = 60.0
# The detail of the destination's record when its arrival failed (the
# supervisor's incoming_failed): nothing ran there.
ARRIVAL_FAILED = "incoming migration failed"
# The source QEMU's run states after a completed migration: paused, its
# state sent.
PAUSED_BY_MIGRATION = ("postmigrate", "finish-migrate")
# How long the destination's supervisor waits for the stream to come.
STREAM_WAIT = 60.0
# While the state comes in, the stream never rests: QEMU on the destination
# that read nothing for this long hangs on a link that died without a word
# (ssh's keepalives end the source's side, sshd's side may wait for hours).
STALL_LIMIT = 15.0
# QEMU's own defaults of downtime-limit and max-bandwidth (7.2 and 10.0
# alike), set again at every migration: what migrate-set-parameters set
# stays in QEMU, for the next migration too (a cancelled one's --bandwidth).
DEFAULT_DOWNTIME_MS = 300
MAX_DOWNTIME_MS = 2_000_000  # QEMU's largest downtime-limit (7.2 and 10.0)
DEFAULT_BANDWIDTH = 128 << 20  # bytes per second
# QEMU sends the guest's memory in passes, each one what the guest wrote
# during the last; it pauses the guest once what is left fits in the
# downtime limit.  A guest that writes as fast as the link sends reaches a
# steady state within a few passes and never gets there: after this many,
# with the expected downtime still above the limit, the move is cancelled
# (an idle guest moves in a few passes).
MAX_PASSES = 30


def parameters(downtime_ms: object, bandwidth: object) -> dict[str, Any]:
    """migrate-set-parameters' arguments for one migration: what was asked
    for, QEMU's defaults for the rest (never what an earlier one left)."""
    def given(value: object, default: int) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        return default
    return {"downtime-limit": given(downtime_ms, DEFAULT_DOWNTIME_MS),
            "max-bandwidth": given(bandwidth, DEFAULT_BANDWIDTH)}


class SideFacts(NamedTuple):
    """What one host says about guest NAME: its configuration as
    effective_config gives it (flattened, "nic[0].bridge" keys) or why it
    did not load; whether it runs there; what its host checks found
    missing (bridges, disks, kernel files, the machine type); the machine
    types its QEMU has.  Crosses ssh as JSON (kvmagent migrate-incoming
    --facts)."""
    config: dict[str, Any] | None
    error: str  # why config is None
    running: bool
    problems: list[str]
    machines: list[str]
    qemu_version: str

    @classmethod
    def from_json(cls, data: object) -> SideFacts:
        """ValueError naming the field when DATA is not such a record."""
        return read(cls, data)


class Refusal(NamedTuple):
    """Why a guest may not move, and the exit status that says so."""
    message: str
    hint: str | None
    status: ExitStatus


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"kernel": {"image": x}, "nic": [{"mac": m}]} -> {"kernel.image": x,
    "nic[0].mac": m}: the keys a mismatch names."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out |= flatten(value, name)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                out |= flatten(item, f"{name}[{i}]")
            out[f"{name}.count"] = len(value)
        else:
            out[name] = value
    return out


def differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """The keys whose values differ, sorted."""
    a, b = flatten(ours), flatten(theirs)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


# -cpu models whose CPU is the host's, not a named model: cpu = "host" is
# host passthrough under KVM and "max" under TCG (all this QEMU emulates)
UNMIGRATABLE_CPUS = {"host": "its CPU is this host's",
                     "max": "its CPU is all that this host's QEMU and accelerator offer"}


def preflight(name: str, host: str, here: SideFacts, there: SideFacts, *,
              machine: str, cpu: str, force: bool = False) -> list[Refusal]:
    """Every reason guest NAME, running here with MACHINE and CPU (its QEMU's
    own values), may not move to HOST; none: it may.  Nothing has moved
    when this refuses."""
    out: list[Refusal] = []
    if not here.running:
        out.append(Refusal(f"guest {name} is not running here", "kvmagent migrate moves a "
                           "running guest; start it on the other host instead",
                           ExitStatus.NOT_RUNNING))
    if there.running:
        out.append(Refusal(f"guest {name} is running on {host} already", "two copies of a "
                           "guest must never run: stop one of them", ExitStatus.FAILURE))
    if there.config is None:
        out.append(Refusal(f"{host}: guest {name}: {there.error}", f"copy guests/{name}.toml "
                           f"(and its drop-ins) to {host}", ExitStatus.CONFIG))
    elif here.config is not None and (keys := differences(here.config, there.config)):
        out.append(Refusal(f"guest {name}'s configuration on {host} differs in: "
                           f"{', '.join(keys)}", f"make guests/{name}.toml the same on both "
                           f"hosts (kvmagent show {name} on each)", ExitStatus.CONFIG))
    for problem in there.problems:
        disk = re.search(r"disk\[\d+\]\.path = .*: disk does not exist", problem) is not None
        out.append(Refusal(f"{host}: {problem}",
                           "the disks must be on storage both hosts share, at the same path, "
                           "or be copied there: --copy-storage" if disk else None,
                           ExitStatus.HOST_NOT_READY))
    if not MACHINE_RE.fullmatch(machine) or not CPU_RE.fullmatch(cpu):
        out.append(Refusal(f"guest {name}'s QEMU runs with -machine {machine!r} -cpu {cpu!r}, "
                           "which cannot be passed on", None, ExitStatus.FAILURE))
    elif there.machines and machine not in there.machines:
        out.append(Refusal(f"{host}: QEMU {there.qemu_version} has no machine type {machine} "
                           f"(guest {name}'s QEMU here runs it)", "migrate to a host with the "
                           "same or a newer QEMU", ExitStatus.HOST_NOT_READY))
    model = cpu.split(",")[0]
    if model in UNMIGRATABLE_CPUS and not force:
        out.append(Refusal(f"guest {name} runs with -cpu {model}: {UNMIGRATABLE_CPUS[model]}, "
                           f"which {host}'s may not be", "--force if both hosts have the same "
                           "CPU and the same QEMU", ExitStatus.FAILURE))
    return out


# QEMU before 9.0 can lose a TCG guest's memory writes during a migration
# (fixed upstream by commit 03bfc2188f, in 9.0); KVM guests are not affected.
TCG_FIXED_IN = (9, 0)


def tcg_warning(name: str, kvm: object, qemu: object) -> str | None:
    """What to say before moving guest NAME whose QEMU here (QEMU: [major,
    minor, micro] from migrate-status) runs it without KVM (KVM false)."""
    if kvm is not False or not isinstance(qemu, list) or len(qemu) != 3 \
            or not all(isinstance(n, int) for n in qemu) or tuple(qemu[:2]) >= TCG_FIXED_IN:
        return None
    return (f"warning: guest {name} runs without KVM (TCG) on QEMU "
            f"{'.'.join(map(str, qemu))}: QEMU before 9.0 can lose some of a TCG guest's "
            "memory writes in a move (fixed upstream in 9.0), which may crash it there")


class Step(enum.Enum):
    WAIT = "wait"
    CANCEL = "cancel"  # migrate_cancel; the guest runs on here
    END = "end"  # the guest runs there: end it here
    ASK = "ask"  # the state went there, the destination's word did not come: settle_step


class Decision(NamedTuple):
    step: Step
    why: str = ""


def not_converging(info: dict[str, Any], limit_ms: int) -> str | None:
    """Why a move cannot end within its downtime limit (LIMIT_MS), from
    the source QEMU's query-migrate answer (INFO); None while it may."""
    ram = info.get("ram")
    ram = ram if isinstance(ram, dict) else {}
    passes, expected = ram.get("dirty-sync-count"), info.get("expected-downtime")
    if info.get("status") != "active" or not isinstance(passes, int) \
            or not isinstance(expected, int) or passes < MAX_PASSES or expected <= limit_ms:
        return None
    return (f"it cannot end within the downtime limit: after {passes} passes over the "
            f"guest's memory QEMU still expects {expected} ms of downtime (limit "
            f"{limit_ms} ms), the guest writing its memory about as fast as the link sends "
            f"it; a larger --max-downtime or --bandwidth, or a quieter guest, lets it move")


def source_step(phase: str, dest: str, *, interrupted: bool, completed_for: float | None,
                dest_gone: bool, info: dict[str, Any] | None = None,
                limit_ms: int = DEFAULT_DOWNTIME_MS) -> Decision:
    """What `kvmagent migrate` does next.  PHASE: the source QEMU's
    query-migrate status; DEST: the destination's last word ("", "listening",
    "running", "failed: ..."); completed_for: seconds since the source said
    "completed" (None: not yet); dest_gone: the ssh session ended.

    Once the source completed, the destination has the whole guest and may
    run it, whatever its session said or failed to say: the source may no
    longer resume it on its own (two copies of one guest on one shared
    disk), it asks (Step.ASK, then settle_step)."""
    if dest == "running":
        return Decision(Step.END)
    if completed_for is not None:
        if interrupted:
            return Decision(Step.ASK, "interrupted after the state was sent")
        if dest.startswith("failed"):
            return Decision(Step.ASK, f"the destination {dest}, after the state was sent")
        if dest_gone:
            return Decision(Step.ASK, "the connection to the destination ended after the "
                            "state was sent")
        if completed_for > CONFIRM_TIMEOUT:
            return Decision(Step.ASK, f"the destination did not confirm within "
                            f"{CONFIRM_TIMEOUT:g} s that the guest runs there")
        return Decision(Step.WAIT)
    if interrupted:
        return Decision(Step.CANCEL, "interrupted")
    if dest.startswith("failed"):
        return Decision(Step.CANCEL, f"the destination {dest}")
    if dest_gone:
        return Decision(Step.CANCEL, "the connection to the destination ended")
    if phase in ("failed", "cancelled", "cancelling"):
        return Decision(Step.CANCEL, f"the migration {phase} here")
    if info and (why := not_converging(info, limit_ms)):
        return Decision(Step.CANCEL, why)
    return Decision(Step.WAIT)


class Settle(enum.Enum):
    WAIT = "wait"  # ask again
    END = "end"  # the guest runs there: end it here
    RESUME = "resume"  # it does not run there, and never did: resume it here
    HOLD = "hold"  # unknown: the guest stays paused here, the admin decides


class Where(NamedTuple):
    """What the destination says of guest NAME (migrate-incoming --where):
    its unit's state, its QEMU's run state (None: no supervisor answered),
    whether it is still arriving, and the last event of its record there
    ([event, reason, detail], or None).  Crosses ssh as JSON."""
    unit: str
    runstate: str | None
    arriving: bool
    last: list[str | None] | None

    @classmethod
    def from_json(cls, data: object) -> Where:
        """ValueError naming the field when DATA is not such a record."""
        return read(cls, data)


class Said(NamedTuple):
    """One line that `kvmagent migrate-incoming` writes to the source (its
    standard output, over ssh): the destination's progress, event by
    event.  Crosses ssh as JSON, with the fields its event has."""
    event: str  # tcp, tcp-connected, serving, listening, incoming, running, failed
    error: str = ""  # failed: why
    status: int | None = None  # failed: the exit status it stands for
    state: str = ""  # incoming: QEMU's migration status there
    resumed_at: float | None = None  # running: when the guest ran there (its clock)
    address: str = ""  # tcp: where it listens for the stream
    port: int = 0
    peer: str = ""  # tcp-connected: who connected with the token
    dropped: list[str] = []  # tcp-connected: the others, refused

    def line(self) -> str:
        """The JSON line: the event and the fields it has."""
        defaults = Said._field_defaults
        return json.dumps({k: v for k, v in self._asdict().items()
                           if k not in defaults or v != defaults[k]})

    @classmethod
    def from_line(cls, line: bytes | str) -> Said | None:
        """A line read back; None when it is no JSON object with an event.
        A line of another shape (another kvmagent's) counts by its event."""
        try:
            data = json.loads(line)
        except ValueError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("event"), str):
            return None
        try:
            return read(cls, data)
        except ValueError:
            return cls(data["event"], error=str(data.get("error", "")))


def settle_step(there: Where | None, waited: float) -> tuple[Settle, str]:
    """After Step.ASK: what the source does with its paused guest, from
    what the destination said (None: it could not be asked) after WAITED
    seconds of asking.  Resumed here only when the destination says that
    its arrival failed and nothing runs there; ended here only when it runs
    there; otherwise asked again, and at last held paused."""
    if there is not None:
        if there.runstate == "running" and not there.arriving:
            return Settle.END, f"it runs there ({there.unit})"
        detail = str(there.last[2] or "") if there.last and there.last[0] == "stopped" else ""
        if there.unit in ("inactive", "failed") and detail.startswith(ARRIVAL_FAILED):
            return Settle.RESUME, f"its arrival there failed: {detail}"
    if waited > SETTLE_LIMIT:
        said = ("it could not be asked" if there is None else
                f"its unit is {there.unit}, its QEMU {there.runstate or 'not answering'}")
        return Settle.HOLD, (f"the destination did not say within {SETTLE_LIMIT:g} s whether "
                             f"the guest runs there ({said})")
    return Settle.WAIT, ""


class Arrival(enum.Enum):
    WAIT = "wait"
    DONE = "done"  # the state is in: resume the guest here
    FAIL = "fail"


def incoming_step(status: str | None, waited: float) -> tuple[Arrival, str]:
    """The destination's supervisor: STATUS, its QEMU's query-migrate status
    (None: no stream yet), WAITED seconds since QEMU was started."""
    if status is None:
        if waited > STREAM_WAIT:
            return Arrival.FAIL, f"no migration stream came within {STREAM_WAIT:g} s"
        return Arrival.WAIT, ""
    if status == "completed":
        return Arrival.DONE, ""
    if status in ("failed", "cancelled"):
        return Arrival.FAIL, f"the incoming migration {status}"
    return Arrival.WAIT, ""


def stalled(status: str, quiet_for: float) -> str | None:
    """`kvmagent migrate-incoming`: why to give up on the arrival, when its
    QEMU, receiving (STATUS), has read nothing for QUIET_FOR seconds."""
    if status in ("setup", "active") and quiet_for > STALL_LIMIT:
        return f"no data came for {quiet_for:.0f} s: the link to the source is gone"
    return None


def event_time(event: dict[str, Any]) -> float | None:
    """A QMP event's timestamp (the host's wall clock), None without one."""
    stamp = event.get("timestamp")
    if not isinstance(stamp, dict):
        return None
    seconds, micro = stamp.get("seconds"), stamp.get("microseconds")
    if not isinstance(seconds, int) or not isinstance(micro, int) or seconds < 0:
        return None
    return seconds + micro / 1e6


def paused_ms(paused_at: object, resumed_at: object) -> int | None:
    """How long the guest did not run at the switch, as a guest sees it:
    from the source QEMU's pause (its STOP event) until the destination
    resumed it, by the two hosts' clocks (QEMU's own "downtime" ends when
    the source sent the last of the state).  None when either is unknown,
    or the clocks disagree beyond belief (before the pause, over an hour)."""
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool)
               for t in (paused_at, resumed_at)):
        return None
    ms = round((float(resumed_at) - float(paused_at)) * 1000)  # type: ignore[arg-type]
    return ms if 0 <= ms <= 3_600_000 else None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def progress_line(info: dict[str, Any]) -> str:
    """One line of query-migrate's answer, for a person watching."""
    ram = info.get("ram") or {}
    parts = [f"{info.get('status', '?')}"]
    if ram:
        parts.append(f"RAM {_size(ram.get('transferred', 0))} sent, "
                     f"{_size(ram.get('remaining', 0))} left")
        if ram.get("mbps"):
            parts.append(f"{ram['mbps']:.1f} Mbit/s")
        if ram.get("dirty-pages-rate"):
            parts.append(f"{ram['dirty-pages-rate']} dirty pages/s")
    if "expected-downtime" in info:
        parts.append(f"expected downtime {info['expected-downtime']} ms")
    if "downtime" in info:
        parts.append(f"downtime {info['downtime']} ms")
    if "total-time" in info:
        parts.append(f"{info['total-time'] / 1000:.1f} s")
    return ", ".join(parts)
