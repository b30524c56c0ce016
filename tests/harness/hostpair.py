"""HostPair: two throwaway systemd test hosts (TestHost) that reach each other
over ssh, for `kvmagent -H` and live migration (#20).

    with HostPair(("bookworm", "trixie"), deb=deb, shared=tmp_path / "shared") as pair:
        pair[0].run(["kvmagent", "list", "-H", pair.address(1)])

Each host boots its release's cached root (openssh-server is in it,
tests/harness/rootfs.py) with a private network of its own; then one veth
pair is made between the two network namespaces, from inside the first (the
machine's own namespace never holds it), with 10.79.20.1/24 on host 0 and
10.79.20.2/24 on host 1, named host0 and host1 in both /etc/hosts.
10.79.20.3 (UNREACHABLE) is on that link and answers nothing: a host that
cannot be reached, found out in seconds.  Traffic goes nowhere else.

Each host's root gets a key made here, both keys are authorised on both hosts
(root@host0 -> root@host1 and back), and each knows the other's host key
(known_hosts: name and address), so `ssh -o BatchMode=yes` asks nothing.
SHARED_DIR (shared=, a directory of this machine) is bound into both at the
same path: shared storage, as NFS or a SAN would be.  host_bind= gives each
host binds of its own (read-write; a device node of that host alone, as a
disk on its local storage).

kvmagent is installed in both: the package (deb=, with apt from the offline
repository, as an admin would) or, without deb, this checkout
(install_checkout)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import rootfs
from .install import install_checkout, install_package
from .sysutil import HarnessError, run_cmd
from .testhost import TestHost

SUBNET = "10.79.20"
ADDRESSES = (f"{SUBNET}.1", f"{SUBNET}.2")
UNREACHABLE = f"{SUBNET}.3"  # on the link, nobody there
LINK = "pair0"  # the veth's name in both hosts
SHARED_DIR = "/srv/shared"
HOST_CONFIG = 'accel = "tcg"\n'


class HostPair:
    """Two booted test hosts on one private link, with sshd, keys and shared
    storage; a context manager (both are always torn down)."""

    __test__ = False

    def __init__(self, releases: Sequence[str] = ("bookworm", "bookworm"), *,
                 deb: Path | None = None, shared: Path, src: Path | None = None,
                 journal_dir: Path | None = None, host_config: str = HOST_CONFIG,
                 bind_ro: Sequence[tuple[Path, str]] = (),
                 host_bind: Sequence[Sequence[tuple[Path, str]]] = ()) -> None:
        if len(releases) != 2:
            raise HarnessError(f"a host pair is two hosts, not {len(releases)}")
        self.releases = [rootfs.resolve(r) for r in releases]
        self.deb, self.shared, self.src = deb, shared, src
        self.journal_dir, self.host_config = journal_dir, host_config
        self.bind_ro = list(bind_ro)  # more read-only binds (another offline repository)
        if host_bind and len(host_bind) != 2:
            raise HarnessError(f"host_bind: the binds of each of two hosts, not {len(host_bind)}")
        self.host_bind = [list(b) for b in host_bind] or [[], []]
        self.hosts: list[TestHost] = []
        self._stack = contextlib.ExitStack()

    def __getitem__(self, i: int) -> TestHost:
        return self.hosts[i]

    def __iter__(self) -> Iterator[TestHost]:
        return iter(self.hosts)

    @staticmethod
    def address(i: int) -> str:
        return ADDRESSES[i]

    def __enter__(self) -> HostPair:
        self.shared.mkdir(parents=True, exist_ok=True)
        try:
            for release, own in zip(self.releases, self.host_bind):
                debs = rootfs.cached_debs(release)
                th = TestHost(root=release, src=self.src, bind_ro=[(debs, "/mnt/debs"), *self.bind_ro],
                              bind=[(self.shared, SHARED_DIR), *own], journal_dir=self.journal_dir)
                self._stack.enter_context(th)
                self.hosts.append(th)
            self._link()
            self._ssh()
            for th in self.hosts:
                if self.deb is not None:
                    install_package(th, self.deb, self.host_config)
                else:
                    install_checkout(th, self.host_config)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def close(self) -> None:
        """Both hosts torn down now (again at the end of the with block: nothing)."""
        self._stack.close()

    def _link(self) -> None:
        """The veth pair, made in host 0's namespace with its peer put
        straight into host 1's."""
        a, b = self.hosts
        # this machine's ip, in host 0's network namespace alone (PIDs as seen here)
        run_cmd(["nsenter", "-t", str(a.leader), "-n", "ip", "link", "add", LINK, "type",
                 "veth", "peer", "name", LINK, "netns", str(b.leader)])
        names = "".join(f"{addr} host{i}\n" for i, addr in enumerate(ADDRESSES))
        for th, addr in zip(self.hosts, ADDRESSES):
            th.exec(["ip", "address", "add", f"{addr}/24", "dev", LINK])
            th.exec(["ip", "link", "set", LINK, "up"])
            th.exec(["ip", "link", "set", "lo", "up"])
            hosts = th.exec(["cat", "/etc/hosts"], check=False).stdout
            th.write_file("/etc/hosts", hosts + names)

    def _ssh(self) -> None:
        """sshd running, a key for each root, each trusted by both, each host's
        key known to the other."""
        keys, host_keys = [], []
        for th in self.hosts:
            th.exec(["install", "-d", "-m", "700", "/root/.ssh"])
            th.exec(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{th.name}",
                     "-f", "/root/.ssh/id_ed25519"])
            keys.append(th.exec(["cat", "/root/.ssh/id_ed25519.pub"]).stdout.strip())
            host_keys.append(th.exec(["cat", "/etc/ssh/ssh_host_ed25519_key.pub"]
                                     ).stdout.split()[:2])
            th.exec(["systemctl", "start", "ssh.service"])
        known = "".join(f"host{i},{addr} {' '.join(k)}\n"
                        for i, (addr, k) in enumerate(zip(ADDRESSES, host_keys)))
        for th in self.hosts:
            th.write_file("/root/.ssh/authorized_keys", "\n".join(keys) + "\n", 0o600)
            th.write_file("/root/.ssh/known_hosts", known, 0o600)
        for i, th in enumerate(self.hosts):  # each reaches the other, asked nothing
            other = f"host{1 - i}"
            th.exec(["sh", "-c", "for i in $(seq 20); do ssh -o BatchMode=yes -o "
                     f"ConnectTimeout=5 {other} true && exit 0; sleep 0.2; done; exit 1"],
                    timeout=60)

    def ssh_config(self, text: str) -> None:
        """Root's ~/.ssh/config on both hosts (ControlMaster for a measurement)."""
        for th in self.hosts:
            th.write_file("/root/.ssh/config", text, 0o600)


def shared_path(*parts: str) -> str:
    """A path under the shared storage, as both hosts see it."""
    return os.path.join(SHARED_DIR, *parts)
