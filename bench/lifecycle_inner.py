"""Runs inside the test host (see bench_lifecycle.py): times bare QEMU and
kvmagent on the same tiny guest and prints JSON.  argv: KERNEL INITRD N"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, "/src/kvmagent")
from kvmagent.host.qmp import Qmp  # noqa: E402
from kvmagent.render.service import SANDBOX, render_service  # noqa: E402

KERNEL, INITRD, N = sys.argv[1], sys.argv[2], int(sys.argv[3])
GUEST = "bench"


def bare_argv(qmp_fd: int, con_fd: int, accel: str = "tcg") -> list[str]:
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


def bare(graceful: bool, accel: str = "tcg") -> tuple[float, float]:
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
    read_until(ca, b"GUEST-READY")
    read_until(ca, b"guest# ", 10)
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


def journal_has(marker: str, since: str, guest: str = GUEST) -> bool:
    out = subprocess.run(["journalctl", "-u", f"kvm@{guest}", "--since", since, "-o", "cat",
                          "--no-pager"], capture_output=True, text=True).stdout
    return marker in out


def kvmagent(graceful: bool | None, guest: str = GUEST) -> tuple[float, float]:
    # (the start limit, 5 starts in 10 min, is for crashing guests, not for this)
    subprocess.run(["systemctl", "reset-failed", f"kvm@{guest}"], stderr=subprocess.DEVNULL)
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    t0 = time.perf_counter()
    subprocess.run(["systemctl", "start", f"kvm@{guest}"], check=True)
    running = time.perf_counter() - t0  # Type=notify: READY=1 after QMP says running
    while not journal_has("Enter 'help'", since, guest):  # the shell is up
        time.sleep(0.1)
    time.sleep(0.5)
    t1 = time.perf_counter()
    if graceful is True:
        subprocess.run(["systemctl", "stop", f"kvm@{guest}"], check=True)
    elif graceful is False:
        subprocess.run(["kvmagent", "stop", "--force", guest], check=True,
                       stdout=subprocess.DEVNULL)
    else:  # the power cord with systemctl alone: SIGUSR1 to the supervisor
        subprocess.run(["systemctl", "kill", "--kill-whom=main", "--signal=SIGUSR1",
                        f"kvm@{guest}"], check=True)
        while subprocess.run(["systemctl", "is-active", "--quiet", f"kvm@{guest}"]).returncode == 0:
            time.sleep(0.002)
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


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def main() -> None:
    result: dict[str, list[float]] = {}
    # QEMU as kvmagent runs TCG (split-wx: under MemoryDenyWriteExecute=)
    splitwx = lambda graceful: bare(graceful, "tcg,split-wx=on")  # noqa: E731
    for label, fn, modes in (("bare", bare, (True, False)),
                             ("splitwx", splitwx, (True, False)),
                             ("kvmagent", kvmagent, (True, False, None))):
        for graceful in modes:
            runs = [fn(graceful) for _ in range(N)]
            key = {True: "graceful", False: "hard", None: "kill"}[graceful]
            result.setdefault(f"{label} running", []).extend(r[0] for r in runs)
            result[f"{label} {key} stop"] = [r[1] for r in runs]
    # a guest with a bridged NIC: the taps are part of the start
    runs = [kvmagent(True, "benchnic") for _ in range(N)]
    result["kvmagent nic running"] = [r[0] for r in runs]
    # memory: the supervisors of 10 running guests
    names = [f"mem{i}" for i in range(10)]
    subprocess.run(["systemctl", "start", *[f"kvm@{n}" for n in names]], check=True)
    time.sleep(3)
    pids = [int(subprocess.run(["systemctl", "show", "-p", "MainPID", "--value", f"kvm@{n}"],
                               capture_output=True, text=True).stdout) for n in names]
    pss = [pss_kib(p) for p in pids]
    subprocess.run(["systemctl", "stop", *[f"kvm@{n}" for n in names]], check=True)
    plain, sandboxed = sandbox_cost()
    print(json.dumps({k: statistics.median(v) for k, v in result.items()}
                     | {"supervisor pss kib": statistics.mean(pss), "guests": len(pss),
                        "exec plain": plain, "exec sandboxed": sandboxed}))


main()
