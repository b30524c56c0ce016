"""TestHost: a throwaway systemd host booted with systemd-nspawn.

    with TestHost(root="host", src=repo, journal_dir=tmp_path) as th:
        th.run(["systemctl", "is-system-running"])      # as a unit inside the container
        th.exec(["cat", "/proc/1/comm"])                # plain nsenter, for cheap inspection

The container's root is an overlay over a *non-recursive* bind of the root tree, made
in a private mount namespace (`unshare -m --propagation private`), so dpkg/apt work
inside, the host's files are never written, and no mount can outlive nspawn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from . import rootfs
from .sysutil import (
    CLEAN_ENV, PYTHON, STATE_ROOT, HarnessError, find_descendant, log, mounts_under,
    proc_alive, proc_start_time, procs_mentioning, run_cmd, safe_rmtree, systemd_is_pid1,
    terminate,
)

NSEXEC = Path(__file__).with_name("_nsexec.py")
PROPAGATE = Path("/run/systemd/nspawn/propagate")  # nspawn leaves NAME/ here on a non-tmpfs /run
REBOOT_EXIT = 133  # nspawn's exit status after a reboot inside (--keep-unit: no restart)
_names = itertools.count(1)


@dataclasses.dataclass
class Record:
    """What another process (`python3 -m tests.harness run/stop/cleanup`) needs to find a host."""

    name: str
    scratch: str
    owner: int
    owner_start: int | None
    nspawn: int = 0
    nspawn_start: int | None = None
    leader: int = 0
    leader_start: int | None = None

    def save(self) -> None:
        path = Path(self.scratch) / "state.json"
        path.with_suffix(".tmp").write_text(json.dumps(dataclasses.asdict(self)))
        path.with_suffix(".tmp").rename(path)

    @classmethod
    def load(cls, scratch: Path) -> Record:
        return cls(**json.loads((scratch / "state.json").read_text()))


def nsenter_argv(leader: int, argv: Sequence[str]) -> list[str]:
    return ["nsenter", "-t", str(leader), "-a", *argv]


def unit_argv(
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    props: Sequence[str] = (),
    cwd: str | None = None,
) -> list[str]:
    """systemd-run argv that runs argv as a transient service and waits for it.

    Processes started by nsenter are in no unit: device policy, machined's
    RegisterMachine (ENXIO) and journal attribution only work inside units (pitfall 7).
    RuntimeMaxSec makes systemd kill the unit when our timeout fires."""
    return [
        "systemd-run", "--wait", "--pipe", "--quiet", "--collect",
        f"--property=RuntimeMaxSec={max(1, math.ceil(timeout))}",
        *(f"--property={p}" for p in props),
        *(f"--setenv={k}={v}" for k, v in (env or {}).items()),
        *([f"--working-directory={cwd}"] if cwd else []),
        "--", *argv,
    ]


def stop_record(rec: Record, grace: float) -> None:
    """SIGTERM nspawn (it asks the container's systemd for an orderly poweroff); if that
    takes longer than grace, SIGKILL the container's init (which kills its whole PID
    namespace; killing only nspawn would orphan it) and then nspawn."""
    if rec.nspawn and not terminate(rec.nspawn, rec.nspawn_start, grace):
        log.warning("%s: no poweroff within %.0f s, SIGKILL", rec.name, grace)
        if rec.leader:
            terminate(rec.leader, rec.leader_start, 10, signal.SIGKILL)
        terminate(rec.nspawn, rec.nspawn_start, 10, signal.SIGKILL)
    if rec.leader:
        terminate(rec.leader, rec.leader_start, 10, signal.SIGKILL)


def leftovers(rec: Record) -> list[str]:
    """Everything of rec's that still exists: processes, mounts, dirs."""
    found = [
        f"{what} pid {pid} still running"
        for what, pid, start in (("systemd-nspawn", rec.nspawn, rec.nspawn_start),
                                 ("container init", rec.leader, rec.leader_start))
        if pid and proc_alive(pid, start)
    ]
    found += [f"process {pid}: {cmd}" for pid, cmd in procs_mentioning(rec.scratch + "/")]
    found += [f"mount {m}" for m in mounts_under(Path(rec.scratch))]
    found += [f"dir {p}" for p in (Path(rec.scratch), PROPAGATE / rec.name) if p.exists()]
    return found


def remove_scratch(rec: Record) -> None:
    with contextlib.suppress(OSError):
        (PROPAGATE / rec.name).rmdir()  # empty unless nspawn still runs
    safe_rmtree(Path(rec.scratch))


def interrupt_on_sigterm() -> None:
    """Turn SIGTERM (a CI time limit, `timeout`, kill) into KeyboardInterrupt,
    so `with TestHost(...)` blocks still tear their hosts down."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Finish teardown even if Ctrl-C is pressed again; re-raise the interrupt afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hit: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: hit.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if hit:
        raise KeyboardInterrupt


class TestHost:
    """A booted throwaway systemd host; use as a context manager (teardown is always run)."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        *,
        root: str | Path = "host",
        name: str | None = None,
        src: Path | None = None,
        bind_ro: Sequence[tuple[str | Path, str]] = (),
        bind: Sequence[tuple[str | Path, str]] = (),
        journal_dir: Path | None = None,
        persistent: bool = False,
        persist_dir: Path | None = None,
        boot_timeout: float = 90.0,
        stop_timeout: float = 30.0,
        nspawn_args: Sequence[str] = (),
        own_cgroup: bool = True,
    ) -> None:
        """root: "host" (the host's / under an overlay), a release ("bookworm", "trixie";
        "debian" is this machine's: the cached debootstrap root, HarnessError telling to
        run setup if missing) or a directory.
        src: the project checkout, bound read-only at /src/kvmagent.
        persistent: mount the overlay ourselves with upper/work in persist_dir (default: in
        the scratch dir) so reboot() keeps state; otherwise --volatile=overlay (tmpfs).
        own_cgroup: where systemd is not PID 1, boot it in a cgroup v2 directory of its
        own (own_cgroup_dir), not the caller's (the default: two test runs side by side,
        or the two hosts of a HostPair, that run a guest of the same name would otherwise
        share the unified hierarchy's machine.slice/kvm-NAME.scope
        (seen with HostPair: each host's scope held the other's QEMU, never ended and
        could not be made anew)."""
        if root == "host":
            self.root_dir = Path("/")
            self.release = rootfs.host_release()
        elif root == "debian" or root in rootfs.RELEASES:
            self.release = rootfs.resolve(str(root))
            self.root_dir = rootfs.cached_root(self.release)
        else:
            self.root_dir = Path(root)
            self.release = rootfs.host_release(self.root_dir / "etc/os-release")
        self.name = name or f"kt{os.getpid()}-{next(_names)}"
        self.scratch = STATE_ROOT / self.name
        self.persistent = persistent
        self.persist_dir = persist_dir or self.scratch / "persist"
        self.journal_dir = journal_dir
        self.boot_timeout, self.stop_timeout = boot_timeout, stop_timeout
        binds = [*([(src, "/src/kvmagent")] if src else []), *bind_ro]
        self._bind_args = [f"--bind-ro={_bind_spec(h, c)}" for h, c in binds]
        self._bind_args += [f"--bind={_bind_spec(h, c)}" for h, c in bind]
        if os.path.exists("/dev/kvm"):
            self._bind_args.append("--bind=/dev/kvm")
        self._extra = list(nspawn_args)
        self.cgroup = own_cgroup_dir(self.name) if own_cgroup and not systemd_is_pid1() else None
        self._proc: subprocess.Popen[bytes] | None = None
        self.rec = Record(self.name, str(self.scratch), os.getpid(), proc_start_time(os.getpid()))
        self.boot_seconds: list[float] = []
        self.boot_state = ""
        self.stop_seconds = 0.0
        self._stopped = False

    # -- lifetime ---------------------------------------------------------------------------

    def __enter__(self) -> TestHost:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        interrupt_on_sigterm()
        STATE_ROOT.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self.scratch.mkdir()
        except FileExistsError:
            self._stopped = True  # not ours: stop() must not remove it
            raise HarnessError(
                f"{self.scratch} exists: another test host named {self.name!r} is running "
                "or was left behind (python3 -m tests.harness cleanup)"
            ) from None
        try:
            self.rec.save()
            self._boot()
        except BaseException:  # also KeyboardInterrupt: never leave a half-booted host
            self.stop()
            raise

    @property
    def leader(self) -> int:
        """PID (in our namespace) of the container's systemd."""
        return self.rec.leader

    @property
    def nspawn_pid(self) -> int:
        return self.rec.nspawn

    def _boot(self) -> None:
        n = len(self.boot_seconds) + 1
        lower = self.scratch / "lower"
        lower.mkdir(exist_ok=True)
        mounts = ["--bind", str(self.root_dir), str(lower)]
        if self.persistent:
            upper, work, merged = (self.persist_dir / "upper", self.persist_dir / "work",
                                   self.scratch / "merged")
            for d in (upper, work, merged):
                d.mkdir(parents=True, exist_ok=True)
            for d in (lower, upper, work):
                if set(str(d)) & set(",:"):
                    raise HarnessError(f"overlay path {d} must not contain ',' or ':'")
            mounts += ["--overlay", str(lower), str(upper), str(work), str(merged)]
            directory, volatile = merged, []
        else:
            # nspawn refuses --volatile=overlay on "/" itself, hence the bind.
            directory, volatile = lower, ["--volatile=overlay"]
        nspawn = [
            "systemd-nspawn", f"--directory={directory}", *volatile,
            # Not registered with the host's machined, and left in the caller's own unit:
            # where systemd is not PID 1 there is neither a machined nor a scope to make.
            "--register=no", "--keep-unit", "--boot", f"--machine={self.name}",
            "--console=read-only", "--private-network", *self._bind_args, *self._extra,
            "--", "systemd.firstboot=off", "systemd.unit=multi-user.target",
        ]
        argv = ["unshare", "--mount", "--propagation", "private",
                PYTHON, str(NSEXEC), *mounts, "--", *nspawn]
        if systemd_is_pid1():
            # Proven by tests/system/test_testhost_pid1.py (nested). With systemd as PID 1,
            # --keep-unit needs nspawn to run in its own delegated unit; `systemd-run --scope`
            # execs its command, so the PID we track is still nspawn's.
            argv = ["systemd-run", "--scope", "--quiet", "--collect", "--property=Delegate=yes",
                    f"--unit=kvmagent-test-{self.name}", "--", *argv]
        console = self.scratch / f"console-{n}.log"
        log.debug("+ %s", " ".join(argv))
        t0 = time.monotonic()
        enter: Callable[[], None] | None = None
        if self.cgroup is not None:
            self.cgroup.mkdir(exist_ok=True)
            procs = str(self.cgroup / "cgroup.procs")

            def enter_cgroup() -> None:  # in the child, before exec: "0" is the writer itself
                with open(procs, "w") as f:
                    f.write("0")
            enter = enter_cgroup
        with open(console, "wb") as out:
            # A new session: Ctrl-C in the terminal reaches us, not nspawn; we tear down.
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, env=CLEAN_ENV, cwd="/",
                                          start_new_session=True, preexec_fn=enter)
        self.rec.nspawn, self.rec.nspawn_start = self._proc.pid, proc_start_time(self._proc.pid)
        self.rec.leader, self.rec.leader_start = 0, None
        self.rec.save()
        state = ""
        while True:
            if self._proc.poll() is not None:
                raise self._boot_error(f"systemd-nspawn exited with status {self._proc.returncode}")
            if not self.rec.leader:
                leader = find_descendant(self._proc.pid, "systemd")
                if leader:
                    self.rec.leader, self.rec.leader_start = leader, proc_start_time(leader)
                    self.rec.save()
            else:
                state = self.exec(["systemctl", "is-system-running"], check=False,
                                  timeout=15).stdout.strip()
                if state in ("running", "degraded"):
                    break
                if state == "maintenance":
                    raise self._boot_error("the container is in emergency/rescue mode")
            if time.monotonic() - t0 > self.boot_timeout:
                raise self._boot_error(
                    f"not booted after {self.boot_timeout:.0f} s (state {state!r})"
                )
            time.sleep(0.05)
        self.boot_seconds.append(time.monotonic() - t0)
        self.boot_state = state
        log.info("%s booted in %.1f s (%s), leader %d", self.name, self.boot_seconds[-1],
                 state, self.leader)

    def _boot_error(self, why: str) -> HarnessError:
        console = sorted(self.scratch.glob("console-*.log"))
        text = console[-1].read_text(errors="replace") if console else ""
        tail = "\n".join(text.splitlines()[-60:])
        return HarnessError(f"test host {self.name}: {why}\n--- container log ---\n{tail}")

    def reboot(self) -> None:
        """`systemctl reboot` inside; nspawn exits 133 and we boot again on the same tree.
        Only persistent=True keeps state (--volatile=overlay's upper layer is a tmpfs)."""
        assert self._proc is not None
        self._save_logs(f"-boot{len(self.boot_seconds)}")
        self.exec(["systemctl", "reboot"], check=False, timeout=30)
        try:
            rc = self._proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            raise self._boot_error(f"no reboot within {self.stop_timeout:.0f} s") from None
        if rc != REBOOT_EXIT:
            raise self._boot_error(f"systemd-nspawn exited {rc} on reboot, not {REBOOT_EXIT}")
        with contextlib.suppress(OSError):
            (PROPAGATE / self.name).rmdir()
        self._boot()

    def poweroff(self, timeout: float) -> float:
        """`systemctl poweroff` inside, the host's own orderly shutdown (as an
        admin's): the seconds until systemd-nspawn exited, or HarnessError
        past TIMEOUT.  The host is gone then; stop() only cleans up.  No
        process entered with exec() may outlive the call: at the shutdown's
        last kill (SIGSTOP first) its nsenter, outside, stays stopped and the
        host waits for its child (seen: 90 s and more); a unit inside
        (systemd-run) does not hold it up."""
        assert self._proc is not None
        self._save_logs("-before-poweroff")
        t0 = time.monotonic()
        self.exec(["systemctl", "poweroff"], check=False, timeout=30)
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self._boot_error(f"no poweroff within {timeout:.0f} s") from None
        return time.monotonic() - t0

    def stop(self) -> None:
        """Poweroff, save the journal, remove everything, then prove nothing is left."""
        if self._stopped:
            return
        self._stopped = True
        with _sigint_deferred():
            t0 = time.monotonic()
            if self._proc is not None and self._proc.poll() is None and self.leader:
                self._save_logs()
            stop_record(self.rec, self.stop_timeout)
            if self._proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=10)  # reap it
            self.stop_seconds = time.monotonic() - t0
            self._save_console()
            if self.cgroup is not None:
                remove_cgroup(self.cgroup)
            remove_scratch(self.rec)
            left = leftovers(self.rec)
            if left:
                raise HarnessError(f"test host {self.name} left things behind: {left}")

    def _save_logs(self, suffix: str = "") -> None:
        """Save the container's full journal: failures are diagnosed from it afterwards."""
        if self.journal_dir is None:
            return
        try:
            text = self.journal()
        except HarnessError as exc:
            text = f"journalctl failed: {exc}\n"
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        (self.journal_dir / f"{self.name}-journal{suffix}.txt").write_text(text)

    def _save_console(self) -> None:
        if self.journal_dir is None or not self.scratch.is_dir():
            return
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        for log_file in self.scratch.glob("console-*.log"):
            shutil.copyfile(log_file, self.journal_dir / f"{self.name}-{log_file.name}")

    # -- using it ---------------------------------------------------------------------------

    def exec(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60.0,
        input: str | bytes | None = None,
        env: Mapping[str, str] | None = None,
        text: bool = True,
    ) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
        """Run argv in the container's namespaces, outside any unit (cheap inspection only)."""
        if not self.leader:
            raise HarnessError(f"test host {self.name} is not running")
        return run_cmd(nsenter_argv(self.leader, argv), check=check, timeout=timeout,
                       input=input, env=env, text=text)

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 120.0,
        input: str | bytes | None = None,
        env: Mapping[str, str] | None = None,
        props: Sequence[str] = (),
        cwd: str | None = None,
        text: bool = True,
    ) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
        """Run argv inside the container as a transient service (run-u*.service) and wait.
        props are extra `-p KEY=VALUE` unit properties; the exit status is argv's."""
        return self.exec(unit_argv(argv, timeout=timeout, env=env, props=props, cwd=cwd),
                         check=check, timeout=timeout + 15, input=input, text=text)

    def journal(self, unit: str | None = None) -> str:
        argv = ["journalctl", "-o", "short-precise", "--no-pager", *(["-u", unit] if unit else [])]
        return str(self.exec(argv, check=False, timeout=60).stdout)

    def write_file(self, path: str, data: str | bytes, mode: int = 0o644) -> None:
        """Create path (and its parents) inside the container.

        Through `install` in the container, not via /proc/PID/root: an absolute symlink
        inside the container would resolve against the host's root there."""
        raw = data.encode() if isinstance(data, str) else data
        self.exec(["install", "-D", "-m", f"{mode:o}", "/dev/stdin", path], input=raw, text=False)

    def copy_in(self, src: Path, dst: str, mode: int | None = None) -> None:
        self.write_file(dst, Path(src).read_bytes(), mode if mode is not None else
                        Path(src).stat().st_mode & 0o7777)


def own_cgroup_dir(name: str) -> Path | None:
    """A cgroup v2 directory for test host NAME at the top of this machine's
    unified hierarchy (None: there is none)."""
    for top in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if (top / "cgroup.procs").exists() and (top / "cgroup.max.depth").exists():
            return top / f"kvmagent-test-{name}"
    return None


def remove_cgroup(path: Path) -> None:
    """An empty cgroup tree, deepest first (what the container's systemd left)."""
    if not path.is_dir():
        return
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


def _bind_spec(host: str | Path, ct: str) -> str:
    host = Path(host).resolve()
    if not host.exists():
        raise HarnessError(f"bind source {host} does not exist")
    if ":" in str(host) or ":" in ct:
        raise HarnessError(f"bind paths must not contain ':' ({host} -> {ct})")
    return f"{host}:{ct}"
