"""Host adapters, each to one thing: netlink (netdev) and the tap ioctls
(tundev), systemd (systemd, sdnotify, journal) and machined, QEMU's QMP
(qmp), its capabilities (qemucaps) and user (qemuuser), /dev/kvm
(kvmprobe), the host's readiness for a guest (hostcheck), the SQLite
uptime record (state), and the lean imports of pystemd and pyroute2
(leanimport)."""
