"""Host adapters, each to one thing: netlink (netlink; on it the taps,
netdev, and the bridges, bridge) and the tap ioctls (tundev), systemd
(systemd, sdnotify, journal) and machined, QEMU's QMP (qmp), its
capabilities (qemucaps) and user (qemuuser), /dev/kvm (kvmprobe), the
host's readiness for a guest (hostcheck), the SQLite record of guests'
lifecycles (state, its schema in migrations, a damaged one set aside by
statefile), pinned machine types (pinfile), disk images and devices
(imagechain, storage, diskfacts), another host over ssh (ssh), Debian's
package database (dpkgfiles), Pacemaker's CIB (cib), and the lean
imports of pystemd and pyroute2 (leanimport)."""
