"""Runs inside the test host (see bench_lifecycle.py): times bare QEMU,
kvmagent and libvirt on the same tiny guest, their runs interleaved, and
prints JSON: every sample of every way.  argv: KERNEL INITRD ROUNDS

A round starts and stops the guest twice with each way, in an order that
turns from round to round: once with a graceful stop, once with a hard
stop.  Round 0 warms up (caches, libvirt's capability probe) and is not
counted.  Before a stop the guest's shell is up (its banner on the
console) and half a second has passed: an ACPI power button pressed before
the guest's handler listens is lost, for every manager alike."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

sys.path.insert(0, "/src/kvmagent")
from kvmagent.host.qmp import Qmp  # noqa: E402
from kvmagent.render.service import SANDBOX, render_service  # noqa: E402

KERNEL, INITRD, ROUNDS = sys.argv[1], sys.argv[2], int(sys.argv[3])
GUEST = "bench"
BANNER = b"Enter 'help'"  # the guest's shell is up
SETTLE = 0.5  # seconds after the banner, before any stop
CONSOLE = f"/var/log/libvirt/qemu/{GUEST}.console"  # the libvirt domain's serial (bench_lifecycle)
Sample = tuple[float, float]  # (start, stop) seconds


def bare_argv(qmp_fd: int, con_fd: int, accel: str) -> list[str]:
    return ["qemu-system-x86_64", "-accel", accel, "-m", "256", "-nodefaults",
            "-no-user-config", "-display", "none", "-kernel", KERNEL, "-initrd", INITRD,
            "-append", "console=ttyS0 quiet panic=-1",
            "-chardev", f"socket,id=qmp,fd={qmp_fd}", "-mon", "chardev=qmp,mode=control",
            "-chardev", f"socket,id=con,fd={con_fd}", "-serial", "chardev:con",
            "-device", "pvpanic"]


def read_until(sock: socket.socket, marker: bytes, timeout: float = 120) -> None:
    buf, deadline = b"", time.monotonic() + timeout
    sock.settimeout(1)
    while marker not in buf and time.monotonic() < deadline:
        try:
            buf += sock.recv(65536)
        except TimeoutError:
            pass


def bare(graceful: bool, accel: str = "tcg") -> Sample:
    """exec -> QMP "running"; system_powerdown (again each second) -> exit;
    kill -9 -> exit."""
    qa, qb = socket.socketpair()
    ca, cb = socket.socketpair()
    t0 = time.perf_counter()
    p = subprocess.Popen(bare_argv(qb.fileno(), cb.fileno(), accel),
                         pass_fds=[qb.fileno(), cb.fileno()])
    qb.close()
    cb.close()
    q = Qmp(qa)
    while q.execute("query-status")["status"] != "running":
        time.sleep(0.001)
    running = time.perf_counter() - t0
    read_until(ca, BANNER)
    time.sleep(SETTLE)
    t1 = time.perf_counter()
    if graceful:
        while p.poll() is None:
            q.execute("system_powerdown")
            try:
                p.wait(1)
            except subprocess.TimeoutExpired:
                pass
    else:
        p.kill()
        p.wait()
    stop = time.perf_counter() - t1
    qa.close()
    ca.close()
    return running, stop


def run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def journal_has(marker: str, since: str) -> bool:
    out = subprocess.run(["journalctl", "-u", f"kvm@{GUEST}", "--since", since, "-o", "cat",
                          "--no-pager"], capture_output=True, text=True).stdout
    return marker in out


def kvmagent(graceful: bool, cli: bool) -> Sample:
    """cli: `kvmagent start/stop/stop --force`; else systemctl: `start`
    (Type=notify: returns when QMP says running), `stop` (ACPI), and the
    power cord with systemctl alone (SIGUSR1 to the supervisor, until
    inactive)."""
    unit = f"kvm@{GUEST}"
    # (the start limit, 5 starts in 10 min, is for crashing guests, not for this)
    subprocess.run(["systemctl", "reset-failed", unit], stderr=subprocess.DEVNULL)
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    t0 = time.perf_counter()
    run(["kvmagent", "start", GUEST] if cli else ["systemctl", "start", unit])
    running = time.perf_counter() - t0
    while not journal_has(BANNER.decode(), since):
        time.sleep(0.1)
    time.sleep(SETTLE)
    t1 = time.perf_counter()
    if cli:
        run(["kvmagent", "stop", GUEST] if graceful else ["kvmagent", "stop", "--force", GUEST])
    elif graceful:
        run(["systemctl", "stop", unit])
    else:
        run(["systemctl", "kill", "--kill-whom=main", "--signal=SIGUSR1", unit])
        while subprocess.run(["systemctl", "is-active", "--quiet", unit]).returncode == 0:
            time.sleep(0.002)
    return running, time.perf_counter() - t1


def console_size() -> int:
    try:
        return os.path.getsize(CONSOLE)
    except OSError:
        return 0


def console_has(marker: bytes, offset: int) -> bool:
    try:
        with open(CONSOLE, "rb") as f:
            data = f.read()
    except OSError:
        return False
    # libvirt may truncate the file at a start (append off): then from its start
    return marker in (data[offset:] if len(data) > offset else data)


def domstate() -> str:
    return subprocess.run(["virsh", "domstate", GUEST], capture_output=True,
                          text=True).stdout.strip()


def libvirt(graceful: bool, gone: list[float]) -> Sample:
    """`virsh start` (returns once QEMU runs the guest's CPUs); `virsh
    shutdown` (ACPI; it returns at once) until `virsh domstate` says shut
    off, QEMU's own exit noted in GONE; `virsh destroy` (returns once QEMU
    is gone)."""
    offset = console_size()
    t0 = time.perf_counter()
    run(["virsh", "start", GUEST])
    running = time.perf_counter() - t0
    while not console_has(BANNER, offset):
        time.sleep(0.1)
    time.sleep(SETTLE)
    with open(f"/run/libvirt/qemu/{GUEST}.pid") as f:
        pid = int(f.read())
    t1 = time.perf_counter()
    if graceful:
        run(["virsh", "shutdown", GUEST])
        while os.path.exists(f"/proc/{pid}"):
            time.sleep(0.002)
        gone.append(time.perf_counter() - t1)
        while domstate() != "shut off":
            time.sleep(0.002)
    else:
        run(["virsh", "destroy", GUEST])
    return running, time.perf_counter() - t1


def sandbox_cost() -> tuple[float, float]:
    """What systemd takes to run /bin/true as a service: plain, and with
    kvm@.service's sandbox (the part of a start that is systemd's alone)."""
    props = [f"--property={line}" for line in render_service(SANDBOX)]
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(10):
        for sandboxed in (False, True):
            t0 = time.perf_counter()
            subprocess.run(["systemd-run", "--quiet", "--wait", "--property=Type=oneshot",
                            *(props if sandboxed else []), "/bin/true"], check=True)
            times[sandboxed].append(time.perf_counter() - t0)
    return statistics.median(times[False]), statistics.median(times[True])


def main() -> None:
    gone: list[float] = []
    ways: dict[str, Callable[[bool], Sample]] = {
        "bare": lambda g: bare(g),
        "splitwx": lambda g: bare(g, "tcg,split-wx=on"),  # QEMU as kvmagent runs TCG
        "systemctl": lambda g: kvmagent(g, cli=False),
        "kvmagent": lambda g: kvmagent(g, cli=True),
        "libvirt": lambda g: libvirt(g, gone),
    }
    names = list(ways)
    samples: dict[str, dict[str, list[float]]] = {w: {} for w in names}
    for n in range(ROUNDS + 1):
        order = names[n % len(names):] + names[:n % len(names)]
        for way in order:
            for graceful in (True, False):
                start, stop = ways[way](graceful)
                if n == 0:
                    continue
                s = samples[way]
                s.setdefault("running", []).append(start)
                s.setdefault("graceful" if graceful else "hard", []).append(stop)
        if n == 0:
            gone.clear()
        print(f"round {n} done", file=sys.stderr, flush=True)
    samples["libvirt"]["qemu gone"] = gone
    plain, sandboxed = sandbox_cost()
    print(json.dumps({"samples": samples, "exec plain": plain, "exec sandboxed": sandboxed}))


main()
