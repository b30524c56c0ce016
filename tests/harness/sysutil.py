"""Small host-side helpers shared by the test host, the rootfs builder and the CLI.

One subprocess chokepoint (argv lists only, a fixed environment), and the
/proc and /proc/self/mountinfo readers that teardown and `cleanup` use to
prove that nothing of ours is left behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

log = logging.getLogger("kvmagent.tests.harness")

# Everything lives under these two roots, so "ours" is easy to recognise.
STATE_ROOT = Path("/run/kvmagent-tests")  # one scratch dir per booted test host
CACHE_ROOT = Path("/var/cache/kvmagent-tests")  # debootstrap roots and offline debs
PYTHON = "/usr/bin/python3"  # Debian's; the pyenv python3 first on PATH must never be used

# A fixed environment: the caller's PATH may start with pyenv shims (they hijack
# python3.11 inside pybuild) and LANG changes tool output.
CLEAN_ENV: dict[str, str] = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "HOME": "/root",
}


class HarnessError(Exception):
    """A test host could not be built, booted, used or cleaned up."""


def run_cmd(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = 120.0,
    input: str | bytes | None = None,
    env: Mapping[str, str] | None = None,
    capture: bool = True,
    text: bool = True,
) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    """Run argv with CLEAN_ENV (+ env); raise HarnessError naming the command on failure."""
    argv = [str(a) for a in argv]
    log.debug("+ %s", " ".join(argv))
    full_env = {**CLEAN_ENV, **(env or {})}
    try:
        proc = subprocess.run(
            argv,
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=capture,
            env=full_env,
            timeout=timeout,
            text=text,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"{argv[0]} timed out after {timeout} s: {argv}") from exc
    if check and proc.returncode != 0:
        err = proc.stderr if capture else ""
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
        out = proc.stdout if capture else ""
        if isinstance(out, bytes):
            out = out.decode(errors="replace")
        raise HarnessError(
            f"{argv} returned non-zero exit code {proc.returncode}\n"
            f"stdout: {(out or '').strip()[-2000:]}\nstderr: {(err or '').strip()[-4000:]}"
        )
    return proc


def proc_start_time(pid: int) -> int | None:
    """Start time of pid in clock ticks, or None if it is gone: (pid, start) names a process
    uniquely, so we never signal a recycled PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def proc_alive(pid: int, start: int | None) -> bool:
    """True if (pid, start) still runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0] not in ("Z", "X") and (start is None or int(fields[19]) == start)


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def all_pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def find_descendant(ancestor: int, comm: str, max_depth: int = 3) -> int | None:
    """First process named comm at most max_depth generations below ancestor.

    nspawn forks a child that clones the container's PID 1, so the container's
    systemd is a child or grandchild of the nspawn PID (ct-boot.sh does the same)."""
    parents = {pid: _ppid(pid) for pid in all_pids()}
    for pid, ppid in parents.items():
        depth, cur = 0, ppid
        while cur is not None and cur > 1 and depth < max_depth:
            depth += 1
            if cur == ancestor:
                try:
                    if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                        return pid
                except FileNotFoundError:
                    pass
                break
            cur = parents.get(cur)
    return None


def procs_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, cmdline) of every process whose command line contains text."""
    found = []
    for pid in all_pids():
        if pid == os.getpid():
            continue
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            cmdline = raw.replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if text in cmdline:
            found.append((pid, cmdline.strip()))
    return found


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below path in our mount namespace (/proc/self/mountinfo)."""
    prefix = str(path).rstrip("/")
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # Field 5 is the mount point, octal-escaped (\040 for a space).
        mnt = line.split()[4].encode().decode("unicode_escape")
        if mnt == prefix or mnt.startswith(prefix + "/"):
            found.append(mnt)
    return found


def safe_rmtree(path: Path) -> None:
    """rmtree that refuses to run if anything is mounted below path.

    Our scratch dirs hold the mount point of a bind of the host's /: if that
    mount ever leaked into this namespace, a plain rmtree would delete the host."""
    if not path.exists():
        return
    mounted = mounts_under(path)
    if mounted:
        raise HarnessError(f"refusing to remove {path}: still mounted: {mounted}")
    shutil.rmtree(path)


def terminate(pid: int, start: int | None, grace: float, sig: int = signal.SIGTERM) -> bool:
    """Send sig to (pid, start), wait up to grace seconds; True if it is gone."""
    if not proc_alive(pid, start):
        return True
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not proc_alive(pid, start):
            return True
        time.sleep(0.05)
    return not proc_alive(pid, start)


def systemd_is_pid1() -> bool:
    """True on a normal Debian host, False here (systemd installed but not init)."""
    try:
        comm = Path("/proc/1/comm").read_text().strip()
    except OSError:
        return False
    return os.path.exists("/run/systemd/system") and comm == "systemd"


# -- cached trees (rootfs.py, buildroot.py) ----------------------------------------------

def nspawn_run(root: Path, argv: Sequence[str], *, binds: Sequence[str] = (),
               network: bool = True, volatile: bool = False,
               timeout: float = 1800) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    """Run argv in root, not booted: with the host's network to fill a root,
    or (network=False, volatile=True) on a throwaway overlay without network."""
    machine = f"ktbuild{os.getpid()}"
    try:
        return run_cmd(
            ["systemd-nspawn", "--quiet", f"--directory={root}", f"--machine={machine}",
             "--register=no", "--keep-unit", "--setenv=DEBIAN_FRONTEND=noninteractive",
             "--setenv=LANG=C.UTF-8", *(["--volatile=overlay"] if volatile else []),
             *([] if network else ["--private-network"]), *binds, "--", *argv],
            timeout=timeout)
    finally:
        # nspawn leaves this empty dir behind on a /run that is not tmpfs
        try:
            (Path("/run/systemd/nspawn/propagate") / machine).rmdir()
        except OSError:
            pass


def forget_build_host(root: Path) -> None:
    """An empty machine-id makes every boot of a copy generate its own (debootstrap's
    systemd postinst wrote one, which all would share); without /etc/hostname each
    test host is named after its machine name (debootstrap copied the build host's)."""
    (root / "etc/machine-id").write_text("")
    (root / "etc/hostname").unlink(missing_ok=True)


def put_in_place(tmp: Path, final: Path, tag: str) -> None:
    """Rename a finished tree to its final name, an older one of that name removed."""
    if final.exists():
        old = final.with_name(f".old-{tag}-{os.getpid()}")
        final.rename(old)
        safe_rmtree(old)
    tmp.rename(final)


def remove_unfinished(tmp: Path) -> None:
    """What an interrupted or failed build left, unless something is mounted in it."""
    if tmp.exists():
        if mounts_under(tmp):
            log.error("not removing %s: mounts left under it", tmp)
        else:
            safe_rmtree(tmp)
