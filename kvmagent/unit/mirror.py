"""`kvmagent migrate --copy-storage` in the supervisor
(kvmagent.unit.migration hands it the requests): the source's block
mirrors, the destination's NBD server.  kvmagent.render.storagecopy decides;
this carries it out over QMP.

Neither QEMU nor the supervisor may open a network connection: each disk's
NBD connection is an ssh session that `kvmagent migrate` opens, its end
handed in on the control channel ("migrate-copy") and given to QEMU (getfd,
then a blockdev-add of driver nbd on that fd, and blockdev-mirror onto it).
On the destination, `kvmagent migrate-incoming` hands in a listening unix
socket ("migrate-serve"), on which QEMU's NBD server serves the guest's
writable disks; `kvmagent migrate-nbd`, run over each ssh session, connects
to it.  Standard library and light modules only: this runs in the
long-lived supervisor."""

from __future__ import annotations

import time
from contextlib import suppress
from typing import Any

from kvmagent.host.qmp import QmpError
from kvmagent.render.storagecopy import mirror_job, switch_step
from kvmagent.unit import protocol
from kvmagent.unit.held import Held

LISTENER_FDNAME = "copy-listen"  # QEMU's name of the NBD server's listening socket
POLL = 0.005  # seconds between looks at the mirrors while the guest is paused


def _node(name: str) -> dict[str, Any]:
    return {"node-name": name}


def _jobs(sup: Held) -> list[dict[str, Any]]:
    assert sup.qmp is not None
    jobs = sup.qmp.execute("query-jobs", timeout=5.0)
    return [j for j in jobs if isinstance(j, dict)]


def jobs(sup: Held) -> list[dict[str, Any]]:
    """The mirror jobs of --copy-storage (query-jobs), for migrate-status."""
    ours = {mirror_job(node) for node in sup.mirrors}
    return [j for j in _jobs(sup) if j.get("id") in ours]


def start(sup: Held, ask: protocol.CopyAsk, fds: list[int]) -> dict[str, object]:
    """migrate-copy: mirror drive ASK.disk onto the NBD export of the same
    name at the other end of the fd, at ASK.bandwidth bytes/s at most;
    ASK.sync "full" (all of it) or "top" (a qcow2 overlay's own data alone)."""
    assert sup.qmp is not None
    qmp, node, sync = sup.qmp, ask.disk, ask.sync
    if len(fds) != 1 or not node.startswith("disk") or not node[4:].isdigit():
        return protocol.refuse("migrate-copy needs a disk (disk0, ...) and the fd of its NBD "
                               "connection")
    if sync not in ("full", "top"):  # "top": an overlay's own data, its backing there
        return protocol.refuse(f"migrate-copy: sync {sync!r} is neither full nor top")
    job = mirror_job(node)
    if node in sup.mirrors and not any(j.get("id") == job and j.get("status") != "concluded"
                                       for j in _jobs(sup)):
        _end(sup, [node])  # a copy that failed while no command watched it
    if sup.stop.stopping or sup.thaw_at is not None or sup.migrated_to or node in sup.mirrors:
        return protocol.refuse(f"{node}: the guest is stopping, paused or migrated, or the "
                               "disk is being copied already")
    qmp.execute("getfd", timeout=5.0, fds=fds, fdname=job)
    try:
        qmp.execute("blockdev-add", timeout=30.0, driver="nbd", export=node,
                    server={"type": "fd", "str": job}, **_node(job))
    except QmpError:
        with suppress(QmpError):
            qmp.execute("closefd", timeout=5.0, fdname=job)
        raise
    options: dict[str, Any] = {"job-id": job, "auto-dismiss": False}
    if ask.bandwidth is not None:
        options["speed"] = ask.bandwidth
    try:
        qmp.execute("blockdev-mirror", timeout=10.0, device=node, target=job, sync=sync,
                    **options)
    except QmpError:
        with suppress(QmpError):
            qmp.execute("blockdev-del", timeout=10.0, **_node(job))
        raise
    sup.mirrors.append(node)
    sup.log(f"guest {sup.name}: copying {node} to {ask.host}", 5)
    return protocol.reply(protocol.Copying(sync))


def _end(sup: Held, nodes: list[str] | None = None) -> None:
    """Dismiss the mirror jobs of NODES (all) once they concluded, and close
    their NBD connections (blockdev-del of the targets)."""
    assert sup.qmp is not None
    for node in list(sup.mirrors if nodes is None else nodes):
        with suppress(QmpError):
            sup.qmp.execute("job-dismiss", timeout=5.0, id=mirror_job(node))
        with suppress(QmpError):
            sup.qmp.execute("blockdev-del", timeout=10.0, **_node(mirror_job(node)))
        sup.mirrors.remove(node)


def abort(sup: Held) -> None:
    """The migration is cancelled: the mirrors stop at once (the copies on
    the other host are left half made; the destination removes those it
    made).  The guest's own disks are untouched."""
    assert sup.qmp is not None
    if not sup.mirrors:
        return
    for node in sup.mirrors:
        with suppress(QmpError):
            sup.qmp.execute("block-job-cancel", timeout=5.0, device=mirror_job(node), force=True)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        with suppress(QmpError):
            if all(j.get("status") in ("concluded", "null") for j in jobs(sup)):
                break
        time.sleep(0.02)
    _end(sup)


def switchover(sup: Held) -> None:
    """The migration waits before the switch (pre-switchover), the guest
    paused: complete the mirrors (a ready mirror cancelled is a consistent
    copy of this instant), close their NBD connections, and let the
    migration go on (migrate-continue).  A mirror that fails: the migration
    is cancelled, and the guest resumes here."""
    assert sup.qmp is not None
    qmp, nodes = sup.qmp, list(sup.mirrors)
    if not nodes:
        return
    t0 = time.monotonic()
    try:
        for node in nodes:
            qmp.execute("block-job-cancel", timeout=5.0, device=mirror_job(node))
        while True:
            done, why = switch_step(_jobs(sup), nodes, time.monotonic() - t0)
            if done is not None:
                break
            time.sleep(POLL)
    except QmpError as e:
        done, why = False, e.message
    _end(sup)
    if not done:
        sup.log(f"guest {sup.name}: the disks' copy failed at the switch ({why}); the "
                "migration is cancelled", 4)
        with suppress(QmpError):
            qmp.execute("migrate_cancel", timeout=5.0)
        return
    took = (time.monotonic() - t0) * 1000
    try:
        qmp.execute("migrate-continue", timeout=5.0, state="pre-switchover")
    except QmpError as e:
        sup.log(f"guest {sup.name}: migrate-continue failed: {e.message}", 4)
        return
    sup.log(f"guest {sup.name}: the disks' copies completed ({took:.0f} ms, the guest "
            "paused); the switch goes on", 6)


# -- the destination -----------------------------------------------------------

def serve(sup: Held, ask: protocol.ServeAsk, fds: list[int]) -> dict[str, object]:
    """migrate-serve: QEMU's NBD server on the listening socket FDS[0],
    each of ASK.disks (drive ids) a writable export of that name."""
    assert sup.qmp is not None
    qmp, disks = sup.qmp, ask.disks
    if len(fds) != 1 or not disks or sup.serving:
        return protocol.refuse("migrate-serve needs disks and a listening socket, once")
    qmp.execute("getfd", timeout=5.0, fds=fds, fdname=LISTENER_FDNAME)
    qmp.execute("nbd-server-start", timeout=10.0,
                addr={"type": "fd", "data": {"str": LISTENER_FDNAME}})
    sup.serving = True
    nodes = {str(b.get("device")): str(b.get("inserted", {}).get("node-name", ""))
             for b in qmp.execute("query-block", timeout=5.0) if isinstance(b, dict)}
    for disk in disks:
        if not nodes.get(disk):
            with suppress(QmpError):
                stop_serving(sup)
            return protocol.refuse(f"guest {sup.name} has no drive {disk} here")
        try:  # activates the image (QEMU holds it inactive while it waits for the state)
            qmp.execute("block-export-add", timeout=30.0, type="nbd", id=mirror_job(disk),
                        writable=True, name=disk, **_node(nodes[disk]))
        except QmpError as e:  # a lock held elsewhere leaves the image inactive: read-only
            with suppress(QmpError):
                stop_serving(sup)
            return protocol.refuse(f"{disk}: QEMU here cannot write it ({e.message}): is it "
                                   "in use, on storage both hosts share? Then migrate "
                                   "without --copy-storage")
    sup.log(f"guest {sup.name}: serving {', '.join(disks)} for the copy from "
            f"{sup.incoming or '?'}", 6)
    return protocol.reply(protocol.Done())


def stop_serving(sup: Held) -> None:
    """The NBD server stops (and its exports go) before the guest resumes
    here: nothing but the guest writes its disks then."""
    if sup.serving and sup.qmp is not None:
        sup.qmp.execute("nbd-server-stop", timeout=10.0)
        sup.serving = False
