"""Stand-ins for tests/system/test_adoption_semantics.py: a supervisor (the main
process of standin@NAME.service) and its "guest" (a process the supervisor puts into
the transient scope kvm-NAME.scope with StartTransientUnit, as kvmagent does with QEMU).

Run inside a test host, from the read-only checkout:

    python3 adoption_standin.py supervisor NAME     (ExecStart= of the unit)
    python3 adoption_standin.py guest NAME          (started by the supervisor)

Both append one JSON object per event to $STANDIN_LOG/NAME.jsonl (a directory bound
from the test's tmp dir, so it survives a poweroff), with "t": CLOCK_MONOTONIC in
seconds, which is the same clock as systemd's *TimestampMonotonic properties.

The supervisor, configured by the unit's Environment=:
  STANDIN_SCOPE_DEPS  dependencies the scope gets on the service ("PartOf Before")
  STANDIN_FDSTORE     "before-ready", "after-ready" or "" (no FDSTORE=1)
  STANDIN_STOP_DELAY  seconds its graceful stop (SIGTERM) takes (default 0.5)
  STANDIN_STOP_GUEST  "1": that stop then ends the guest and waits for it, as kvmagent's
                      supervisor powers QEMU off; otherwise it leaves the guest running,
                      so whatever stops the scope afterwards is systemd's doing
On start it adopts a guest already in kvm-NAME.scope (logs "adopt"), else starts one.
It reports what systemd handed it: LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID, whether a
handed-back socket still reaches the guest (a ping answered), the runtime directory.
SIGUSR1: an unhandled exception (exit status 1).  SIGUSR2: execv() of itself (same
PID, fds kept).  SIGHUP (ExecReload=): after STANDIN_RELOADING_LAG seconds RELOADING=1 +
MONOTONIC_USEC= and the file reloading in the runtime directory, then after
STANDIN_RELOAD_DELAY seconds execv(); the new code: READY=1.

The guest logs the signals it gets (and exits 0.2 s after one), EOF on its end of the
socketpair, and answers "ping" with "pong PID".
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

NAME = sys.argv[2]
LOG_DIR = os.environ.get("STANDIN_LOG", "/var/log/standin")
SCOPE = f"kvm-{NAME}.scope"
SERVICE = f"standin@{NAME}.service"


def log(event: str, **fields: object) -> None:
    line = json.dumps({"t": time.monotonic(), "pid": os.getpid(), "ev": event, **fields})
    with open(os.path.join(LOG_DIR, f"{NAME}.jsonl"), "a") as f:
        f.write(line + "\n")


def notify(text: str, fds: list[int] | None = None) -> None:
    addr = os.environ["NOTIFY_SOCKET"]
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        # not socket.send_fds(): Python 3.11's ignores its address argument
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        s.sendmsg([text.encode()], ancillary, 0, addr)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (the guest is our child until it is adopted) counts as dead
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def scope_pids() -> list[int]:
    out = subprocess.run(["systemctl", "show", SCOPE, "--property=ActiveState,ControlGroup"],
                         capture_output=True, text=True).stdout
    props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    if props.get("ActiveState") != "active" or not props.get("ControlGroup"):
        return []
    for tree in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd", "/sys/fs/cgroup"):
        try:
            with open(f"{tree}{props['ControlGroup']}/cgroup.procs") as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            continue
    return []


def start_scope(pid: int) -> None:
    """StartTransientUnit over D-Bus, as kvmagent's supervisor does (busctl here)."""
    deps = os.environ.get("STANDIN_SCOPE_DEPS", "").split()
    props = [["PIDs", "au", "1", str(pid)],
             ["CollectMode", "s", "inactive-or-failed"],
             ["Description", "s", f"stand-in guest {NAME}"],
             *([dep, "as", "1", SERVICE] for dep in deps)]
    deadline = time.monotonic() + 10
    while True:  # the previous guest's scope may not be gone yet ("already exists/loaded")
        r = subprocess.run(["busctl", "call", "org.freedesktop.systemd1",
                            "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager",
                            "StartTransientUnit", "ssa(sv)a(sa(sv))", SCOPE, "fail",
                            str(len(props)), *(word for prop in props for word in prop), "0"],
                           capture_output=True, text=True)
        if r.returncode == 0:
            break
        if "already" not in r.stderr or time.monotonic() > deadline:
            raise RuntimeError(f"StartTransientUnit {SCOPE}: {r.stderr.strip()}")
        log("scope-exists")
        time.sleep(0.05)
    while pid not in scope_pids():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{SCOPE} did not come up with {pid}")
        time.sleep(0.02)


def supervisor() -> None:
    generation = int(os.environ.get("STANDIN_GENERATION", "0"))
    listen = {"LISTEN_FDS": os.environ.get("LISTEN_FDS"),
              "LISTEN_FDNAMES": os.environ.get("LISTEN_FDNAMES"),
              "LISTEN_PID": os.environ.get("LISTEN_PID")}
    runtime = os.environ.get("RUNTIME_DIRECTORY", "")
    log("sup-start", generation=generation, **listen,
        runtime_files=sorted(os.listdir(runtime)) if runtime else None,
        watchdog_usec=os.environ.get("WATCHDOG_USEC"))
    guest_sock: socket.socket | None = None
    if generation == 0 and listen["LISTEN_PID"] == str(os.getpid()):
        for i in range(int(listen["LISTEN_FDS"] or 0)):
            s = socket.socket(fileno=3 + i)
            s.settimeout(2)
            try:
                s.sendall(b"ping")
                answer = s.recv(100).decode()
            except OSError as exc:
                answer = f"error: {exc}"
            log("stored-fd", fd=3 + i, answer=answer)
            guest_sock = guest_sock or s
            guest_sock.settimeout(None)
    elif generation > 0:  # after execv(): the socket is still fd STANDIN_FD
        guest_sock = socket.socket(fileno=int(os.environ["STANDIN_FD"]))
        guest_sock.sendall(b"ping")
        log("kept-fd", generation=generation, answer=guest_sock.recv(100).decode())
    pids = scope_pids()
    if pids:
        guest = pids[0]
        log("adopt", guest=guest)
    else:
        mine, theirs = socket.socketpair()
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "guest", NAME],
                                stdin=theirs, close_fds=True)
        theirs.close()
        guest = proc.pid
        start_scope(guest)
        log("scope-started", guest=guest)
        guest_sock = mine
    if runtime:
        with open(os.path.join(runtime, f"sup-{os.getpid()}-{generation}"), "w"):
            pass
    fds = [guest_sock.fileno()] if guest_sock is not None else []
    fdstore = os.environ.get("STANDIN_FDSTORE", "")
    if fdstore == "before-ready" and fds and generation == 0:
        notify("FDSTORE=1\nFDNAME=guest", fds)
    if generation > 0 and os.environ.get("STANDIN_RELOADING") == "1":
        notify("READY=1\nSTATUS=reloaded")
    else:
        notify(f"READY=1\nSTATUS=generation {generation}")
    if fdstore == "after-ready" and fds and generation == 0:
        notify("FDSTORE=1\nFDNAME=guest", fds)
    log("sup-ready", generation=generation, guest=guest)

    def stop(signum: int, frame: object) -> None:
        log("sup-stop-begin", guest_alive=alive(guest))
        time.sleep(float(os.environ.get("STANDIN_STOP_DELAY", "0.5")))
        if os.environ.get("STANDIN_STOP_GUEST") == "1":  # as kvmagent's ACPI power-off
            os.kill(guest, signal.SIGTERM)
            while alive(guest):
                time.sleep(0.01)
        log("sup-stop-end", guest_alive=alive(guest))
        os._exit(0)

    def reexec(reloading: bool) -> None:
        env = dict(os.environ, STANDIN_GENERATION=str(generation + 1),
                   STANDIN_RELOADING="1" if reloading else "0")
        if guest_sock is not None:
            os.set_inheritable(guest_sock.fileno(), True)
            env["STANDIN_FD"] = str(guest_sock.fileno())
        log("sup-exec", generation=generation)
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), "supervisor",
                                   NAME], env)

    crash = threading.Event()

    def reload(signum: int, frame: object) -> None:
        if os.environ.get("WATCHDOG_USEC"):
            notify("WATCHDOG=1")
        time.sleep(float(os.environ.get("STANDIN_RELOADING_LAG", "0")))
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")
        log("sup-reloading")
        if runtime:  # the acknowledgement an ExecReload= client may wait for
            with open(os.path.join(runtime, "reloading"), "w"):
                pass
        time.sleep(float(os.environ.get("STANDIN_RELOAD_DELAY", "0")))
        reexec(True)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGUSR1, lambda signum, frame: crash.set())
    signal.signal(signal.SIGUSR2, lambda signum, frame: reexec(False))
    signal.signal(signal.SIGHUP, reload)
    watchdog = int(os.environ.get("WATCHDOG_USEC") or 0) / 1e6
    while True:
        if crash.wait(watchdog / 4 if watchdog else 3600):
            raise RuntimeError("injected supervisor failure")
        if watchdog:
            notify("WATCHDOG=1")


def guest() -> None:
    sock = socket.socket(fileno=0)
    log("guest-start")

    def on_signal(signum: int, frame: object) -> None:
        log("guest-signal", signal=signal.Signals(signum).name)
        time.sleep(0.2)
        log("guest-exit")
        os._exit(0)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    def reader() -> None:
        while True:
            data = sock.recv(100)
            if not data:
                log("guest-eof")
                return
            log("guest-msg", data=data.decode())
            sock.sendall(f"pong {os.getpid()}".encode())

    threading.Thread(target=reader, daemon=True).start()
    while True:
        signal.pause()


if __name__ == "__main__":
    {"supervisor": supervisor, "guest": guest}[sys.argv[1]]()
