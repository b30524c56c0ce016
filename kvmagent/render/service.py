"""systemd settings of a guest's service, the supervisor's unit.

One pure function, service_settings(), produces them as (key, value) pairs
with unit-file key names.  They are used two ways:

- units/kvm@.service is their rendering for the template instance "%i"
  (tests/unit/test_service.py checks that the shipped file agrees);
- where that template is not installed (a checkout, a pip install), and for
  one-off guests started from a file, kvmagent creates the service itself as
  a transient unit with the same settings (kvmagent.host.systemd.start_service).

Values are plain data: str, int, list[str] (space-separated in a unit file),
list[(path, mode)] for DeviceAllow, an argv list for Exec* (a leading "-" on
the program ignores its failure, as in a unit file), durations as whole
seconds for every *Sec key (systemd's own naming rule), modes as ints.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvmagent.config.values import format_duration

if TYPE_CHECKING:  # kept light: `kvmagent stop --force` imports this module
    from kvmagent.config.model import Guest

Setting = tuple[str, Any]

TEMPLATE = "kvm@.service"
INSTANCE = "%i"  # the template's instance specifier
INSTALLED_COMMAND = ("/usr/bin/kvmagent",)

# The supervisor's sandbox, which QEMU inherits (QEMU also runs as its own
# unprivileged user, kvmagent.host.qemuuser, under its own seccomp filter).  Kept:
# CAP_NET_ADMIN (taps), CAP_SETUID/SETGID (to start QEMU as its user),
# CAP_KILL (to stop it), CAP_SYS_NICE (to un-nice a start-up helper).
# AF_INET/AF_INET6 only for the guests that need them (needs_inet()): a
# drop-in from kvmagent's generator, or the transient unit's own setting.
# systemd and machined accept the scope and machine from uid 0 without
# CAP_SYS_ADMIN (measured on systemd 252).  MemoryDenyWriteExecute= holds for TCG
# too, with -accel tcg,split-wx=on.  ProtectSystem=strict: a guest's writable
# image files outside /var/lib/kvmagent get ReadWritePaths= in a drop-in from
# kvmagent's generator (images_dropin()), or in the transient unit's own
# settings; LVM volumes and other block devices are not affected.  No IPAddressDeny=: QEMU
# opens its VNC socket before it leaves this cgroup for its scope.
SANDBOX: list[Setting] = [
    ("CapabilityBoundingSet", ["CAP_NET_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_KILL",
                               "CAP_SYS_NICE"]),
    ("NoNewPrivileges", True),
    ("ProtectSystem", "strict"),
    ("ProtectHome", True),
    ("PrivateTmp", True),
    ("PrivateMounts", True),
    ("ProtectKernelTunables", True),
    ("ProtectKernelModules", True),
    ("ProtectKernelLogs", True),
    ("ProtectControlGroups", True),
    ("ProtectClock", True),
    ("ProtectHostname", True),
    ("LockPersonality", True),
    ("RestrictRealtime", True),
    ("RestrictSUIDSGID", True),
    ("RestrictNamespaces", True),
    ("MemoryDenyWriteExecute", True),
    ("RestrictAddressFamilies", ["AF_UNIX", "AF_NETLINK"]),  # + INET_FAMILIES if needed
    ("SystemCallArchitectures", ["native"]),
    ("SystemCallFilter", ["@system-service", "seccomp"]),  # QEMU adds its own (-sandbox)
    ("SystemCallErrorNumber", "EPERM"),
    ("UMask", 0o077),
]

# The settings every guest's service has, whatever its name and however it
# was made: units/kvm@.service without its per-guest lines.  A line added to
# the template goes here too (and, if it is new to kvmagent, its D-Bus type
# into kvmagent.render.unitprops.SIGNATURES), or the transient services would lack it.
COMMON: list[Setting] = [
    ("Documentation", ["man:kvm@.service(8)", "man:kvmagent(1)", "man:kvmagent.toml(5)"]),
    ("PartOf", ["machines.target"]),
    ("Before", ["machines.target"]),
    ("Wants", ["modprobe@tun.service", "modprobe@vhost_net.service",
               "network-online.target"]),
    ("After", ["modprobe@tun.service", "modprobe@vhost_net.service", "network-online.target",
               "local-fs.target", "remote-fs.target", "systemd-machined.service",
               "kvmagent-bridges.service"]),
    ("RequiresMountsFor", ["/var/lib/kvmagent"]),
    ("StartLimitIntervalSec", 600),
    ("StartLimitBurst", 5),
    ("Type", "notify"),
    ("NotifyAccess", "main"),
    ("KillMode", "mixed"),
    ("Slice", "machine.slice"),
    ("Restart", "on-failure"),
    # At once: while no supervisor runs, a stop cannot power the guest off.
    ("RestartSec", 0),
    ("RestartPreventExitStatus", [6, 8]),
    ("TimeoutStartSec", 300),
    ("TimeoutStopSec", 90),
    ("WatchdogSec", 30),
    ("TasksMax", 1024),  # as kvm@.service: QEMU starts here, vCPU threads and all
    ("RuntimeDirectoryMode", 0o750),
    # A supervisor that dies leaves its guest running: its successor finds
    # QMP and the console in the fd store, the running record in the runtime
    # directory (kvmagent.unit.adopt).
    ("FileDescriptorStoreMax", 8),
    ("RuntimeDirectoryPreserve", "restart"),
    ("StateDirectory", ["kvmagent"]),
    ("DevicePolicy", "closed"),
    ("DeviceAllow", [("/dev/kvm", "rw"), ("/dev/net/tun", "rw"), ("/dev/vhost-net", "rw"),
                     ("block-device-mapper", "rw"), ("block-sd", "rw"),
                     ("block-virtblk", "rw"), ("block-blkext", "rw"), ("block-loop", "rw"),
                     ("block-sr", "r"), ("block-md", "rw")]),
    *SANDBOX,
]


INET_FAMILIES = ["AF_INET", "AF_INET6"]


def needs_inet(guest: Guest) -> bool:
    """Does the guest's QEMU need IP sockets: VNC on TCP, or user-mode
    networking?  (QEMU inherits the service's RestrictAddressFamilies=.)"""
    vnc = guest.display.vnc
    return bool(vnc and not vnc.startswith("unix:")) or any(
        str(nic.mode) == "user" for nic in guest.nics)


def inet_dropin() -> str:
    """What kvmagent's generator writes for such a guest's kvm@NAME.service."""
    return ("# kvmagent-generator: this guest's QEMU needs IP sockets (VNC on TCP or\n"
            "# user-mode networking)\n[Service]\nRestrictAddressFamilies=AF_INET AF_INET6\n")


# Writable in every guest's service: StateDirectory=kvmagent.  Device nodes
# (LVM volumes and other block devices) are not affected by ProtectSystem=.
STATE_DIRECTORY = "/var/lib/kvmagent"
UNPROTECTED = ("/dev", STATE_DIRECTORY)
IMAGES_DROPIN = "50-kvmagent-images.conf"


def _below(path: str, tops: Sequence[str]) -> bool:
    norm = posixpath.normpath(path)  # lexically: no file system is touched
    return any(norm == top or norm.startswith(top + "/") for top in tops)


def writable_images(guest: Guest) -> list[str]:
    """The guest's image files that QEMU writes and that ProtectSystem=strict
    leaves read-only: its writable disks outside /dev and /var/lib/kvmagent,
    each once, as the guest file names them.  (A read-only disk needs
    nothing: ProtectSystem= leaves reading alone.)"""
    out = [str(d.path) for d in guest.disks
           if not d.readonly and not _below(str(d.path), UNPROTECTED)]
    return list(dict.fromkeys(out))


def _unit_word(path: str, prefix: str = "-") -> str:
    """PATH with systemd's "-" prefix (a missing file is ignored) as one word
    of a unit file's path list: "%" doubled (no specifier), quoted with
    C-style escapes where it has a space, quote or backslash."""
    word = prefix + path.replace("%", "%%")
    if any(ch in word for ch in ' \t"\'\\'):
        word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def images_dropin(paths: Sequence[str]) -> str:
    """What kvmagent's generator writes for a guest with image files outside
    /var/lib/kvmagent: ReadWritePaths= for exactly those files ("-": a file
    that is missing, e.g. on an NFS mount that is not there yet, does not
    fail the unit; kvmagent says what is missing).  The rest of the system
    stays read-only for the guest."""
    return ("# kvmagent-generator: this guest's writable image files outside "
            f"{STATE_DIRECTORY}\n[Service]\n"
            f"ReadWritePaths={' '.join(_unit_word(p) for p in paths)}\n")


def service_settings(name: str, command: Sequence[str] = INSTALLED_COMMAND, *,
                     guest_file: str | None = None, writable: Sequence[str] = (),
                     environment: Sequence[str] = (), inet: bool = False,
                     iso: str | None = None, vnc: str | None = None) -> list[Setting]:
    """The settings of guest NAME's service ("%i": the template's).

    command runs kvmagent (the installed /usr/bin/kvmagent, or python3 -m
    kvmagent from a checkout, with environment such as PYTHONPATH).  With
    guest_file the guest is a one-off loaded from that file; with iso it is
    the install run of guest NAME (from guests/NAME.toml, booting from ISO,
    with the VNC display vnc, if any).  Either service is collected when it
    stops, even failed, and gives way to kvm@NAME.service (Conflicts=, so
    the two never run the same guest name at once)."""
    run = [*command, "run", *(["--file", guest_file] if guest_file else []),
           *(["--install", iso] if iso else []), *(["--vnc", vnc] if iso and vnc else []), name]
    oneoff = bool(guest_file or iso)
    if oneoff:  # a path as it is: no $VARIABLE expanded in it by systemd
        run[0] = f":{run[0]}"
    description = f"KVM guest {name}" + (f" (one-off, {guest_file})" if guest_file else
                                         f" (install from {iso})" if iso else "")
    settings: list[Setting] = [
        ("Description", description),
        *COMMON,
        ("ExecStart", run),
        # How the run ended, when the supervisor could not record it
        # (SIGKILL, OOM); "-": never fails the unit; "+": outside the sandbox
        # (kvm@.service says why).
        ("ExecStopPost", [f"-+{command[0]}", *command[1:], "stop-post", name]),
        # systemctl reload: the supervisor runs the installed code, its guest untouched
        ("ExecReload", [*command, "reload", name]),
        ("RuntimeDirectory", [f"kvmagent/{name}"]),
        # Past the start limit: the guest's QEMU, which outlives its
        # supervisor, is stopped (kvmagent.unit.orphan).
        ("OnFailure", [f"kvmagent-orphan@{name}.service"]),
    ]
    if environment:
        settings.append(("Environment", list(environment)))
    if inet:  # one allow list (D-Bus would not add up two)
        settings = [(key, value + INET_FAMILIES if key == "RestrictAddressFamilies" else value)
                    for key, value in settings]
    if oneoff:
        # A one-off guest's file and images may be anywhere, a home directory
        # included: readable, and its writable images writable ("-": a
        # missing one is QEMU's error to report, not systemd's).
        settings = [("ProtectHome", "read-only") if key == "ProtectHome" else (key, value)
                    for key, value in settings]
        if writable:
            settings.append(("ReadWritePaths", [f"-{path}" for path in writable]))
        if iso:
            # The ISO wherever it is, /tmp and /var/tmp included, which
            # PrivateTmp= would hide: bound read-only at its own path, where
            # the supervisor opens it for QEMU as it opens every disk.
            settings.append(("BindReadOnlyPaths", [(iso, iso)]))
        defined = f"kvm@{name}.service"
        settings += [
            ("CollectMode", "inactive-or-failed"),
            # `systemctl start kvm@NAME` stops the one-off first (stop jobs
            # run before start jobs once the two are ordered at all): they
            # share the scope, machine, taps and runtime directory.
            ("Conflicts", [defined]),
            ("Before", [defined]),
        ]
    return settings


def render_service(settings: Sequence[Setting]) -> list[str]:
    """Unit-file lines (no sections): what units/kvm@.service says."""
    lines = []
    for key, value in settings:
        if key == "DeviceAllow":
            lines += [f"DeviceAllow={path} {mode}" for path, mode in value]  # type: ignore[misc]
        elif key == "BindReadOnlyPaths":  # (source, destination): here always the same
            for src, _ in value:
                escaped = src.replace(":", "\\:")  # a colon would begin the destination
                lines.append(f"BindReadOnlyPaths={_unit_word(escaped, '')}")
        elif key.endswith("Sec") and isinstance(value, int):
            lines.append(f"{key}={format_duration(value)}")
        elif (key.endswith("Mode") or key == "UMask") and isinstance(value, int):
            lines.append(f"{key}={value:04o}")
        elif isinstance(value, bool):
            lines.append(f"{key}={'yes' if value else 'no'}")
        elif isinstance(value, list):
            lines.append(f"{key}={' '.join(map(str, value))}")
        else:
            lines.append(f"{key}={value}")
    return lines
