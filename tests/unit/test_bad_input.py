"""Bad input: every case gets a message naming the file, the key and the
value, a hint where one helps, and exit status 6.  Nothing is written."""

from __future__ import annotations

import pytest

from kvmagent.errors import ExitStatus, KvmagentError

# (id, guest TOML, substrings the message must contain; "{file}" = the guest file)
CASES = [
    ("syntax", "cpus = = 2\n", ["{file}: not valid TOML", "line 1"]),
    ("unknown-key", "memroy = \"1G\"\n", ["{file}: unknown key 'memroy'", "did you mean 'memory'?"]),
    ("unknown-table", "[disks]\npath = \"/x\"\n", ["unknown key 'disks'", "did you mean 'disk'?"]),
    ("unknown-nested", "[[disk]]\npath = \"/x\"\nbuss = \"ide\"\n",
     ["unknown key 'disk[0].buss'", "did you mean 'bus'?"]),
    ("autostart-not-a-key", "autostart = true\n", ["unknown key 'autostart'"]),
    ("cpus-string", 'cpus = "2"\n', ['{file}: cpus = "2": expected an integer']),
    ("cpus-bool", "cpus = true\n", ["cpus = true: expected an integer"]),
    ("cpus-zero", "cpus = 0\n", ["cpus = 0: must be between 1 and 255"]),
    ("cpus-huge", "cpus = 1000\n", ["cpus = 1000: must be between 1 and 255"]),
    ("memory-int", "memory = 1024\n", ["memory = 1024: expected a size string with a unit"]),
    ("memory-unit", 'memory = "1X"\n', ['memory = "1X": expected a size']),
    ("memory-small", 'memory = "1M"\n', ['memory = "1M": must be between 16M and 16T']),
    ("memory-align", 'memory = "1025K"\n', ['memory = "1025K": must be between']),
    ("memory-not-mib", 'memory = "16385K"\n', ['memory = "16385K": must be a multiple of 1M']),
    ("accel", 'accel = "xen"\n', ['accel = "xen": expected one of "auto", "kvm", "tcg"']),
    ("machine", 'machine = "pc,accel=tcg"\n', ['machine = "pc,accel=tcg": expected a QEMU machine type']),
    ("boot-value", 'boot = ["floppy"]\n', ['boot = ["floppy"]: item 0: expected one of']),
    ("boot-twice", 'boot = ["disk", "disk"]\n[[disk]]\npath = "/x"\n', ["boot: [\"disk\", \"disk\"] names a class twice"]),
    ("boot-missing-class", 'boot = ["cdrom"]\n[[disk]]\npath = "/x"\n',
     ['boot: lists "cdrom" but the guest has no [[disk]] with media = "cdrom"']),
    ("boot-network-no-nic", 'boot = ["network"]\n', ['boot: lists "network" but the guest has no [[nic]]']),
    ("boot-with-kernel", 'boot = ["disk"]\n[kernel]\nimage = "/k"\n[[disk]]\npath = "/x"\n',
     ["boot: has no effect with direct kernel boot"]),
    ("disk-boot-not-in-order", 'boot = ["disk"]\n[[disk]]\npath = "/x"\n[[disk]]\npath = "/i.iso"\n'
     'bus = "ide"\nmedia = "cdrom"\nboot = true\n', ['disk[1].boot: is true but boot = ["disk"] does not list "cdrom"']),
    ("two-boot-disks", '[[disk]]\npath = "/x"\nboot = true\n[[disk]]\npath = "/y"\nboot = true\n',
     ["disk[1].boot: disk[0] is already the boot disk"]),
    ("on-poweroff", 'on_poweroff = "pause"\n', ['on_poweroff = "pause": expected one of "stop", "keep"']),
    ("kernel-not-table", 'kernel = "/vmlinuz"\n', ['kernel: must be a table [kernel], not "/vmlinuz"']),
    ("kernel-relative", '[kernel]\nimage = "vmlinuz"\n', ['kernel.image = "vmlinuz": expected an absolute path']),
    ("kernel-no-image", '[kernel]\ncmdline = "ro"\n', ["kernel: initrd or cmdline given without image"]),
    ("disk-not-array", '[disk]\npath = "/x"\n', ["disk: must be an array of tables [[disk]]"]),
    ("disk-no-path", '[[disk]]\nbus = "ide"\n', ["disk[0]: no path"]),
    ("disk-relative", '[[disk]]\npath = "images/a.img"\n', ['disk[0].path = "images/a.img": expected an absolute path']),
    ("disk-bus", '[[disk]]\npath = "/x"\nbus = "sata"\n', ['disk[0].bus = "sata": expected one of "virtio", "ide", "scsi"']),
    ("disk-format", '[[disk]]\npath = "/x"\nformat = "vmdk"\n', ['disk[0].format = "vmdk": expected one of "raw", "qcow2"']),
    ("disk-cache", '[[disk]]\npath = "/x"\ncache = "fast"\n', ['disk[0].cache = "fast": expected one of']),
    ("disk-readonly", '[[disk]]\npath = "/x"\nreadonly = "yes"\n', ['disk[0].readonly = "yes": expected true or false']),
    ("cdrom-virtio", '[[disk]]\npath = "/i.iso"\nmedia = "cdrom"\n', ['disk[0].bus: media = "cdrom" needs bus = "ide" or "scsi"']),
    ("cdrom-writable", '[[disk]]\npath = "/i.iso"\nmedia = "cdrom"\nbus = "ide"\nreadonly = false\n',
     ["disk[0].readonly: a cdrom is always read-only"]),
    ("disk-twice", '[[disk]]\npath = "/x"\n[[disk]]\npath = "/x"\n', ['disk[1].path: "/x" is already disk[0]']),
    ("too-many-ide", "".join(f'[[disk]]\npath = "/d{i}"\nbus = "ide"\n' for i in range(5)),
     ['disk[4].bus: 5 IDE drives; machine "pc" has 4 IDE slots']),
    ("path-newline", '[[disk]]\npath = "/x\\n-drive"\n', ['disk[0].path = "/x\\n-drive": must not contain newlines']),
    ("nic-model", '[[nic]]\nmodel = "ne2k"\n', ['nic[0].model = "ne2k": expected one of "virtio", "e1000", "rtl8139"']),
    ("nic-mode", '[[nic]]\nmode = "macvtap"\n', ['nic[0].mode = "macvtap": expected one of "bridge", "user"']),
    ("nic-mac", '[[nic]]\nmac = "01:00:5e:00:00:01"\n', ['nic[0].mac = "01:00:5e:00:00:01": a multicast MAC']),
    ("nic-mac-format", '[[nic]]\nmac = "52-54-00-12-34-56"\n', ['nic[0].mac = "52-54-00-12-34-56": expected a MAC']),
    ("nic-mac-dup", '[[nic]]\nmac = "52:54:00:00:00:01"\n[[nic]]\nmac = "52:54:00:00:00:01"\n',
     ['nic[1].mac: "52:54:00:00:00:01" is already the MAC of nic[0]']),
    ("nic-bridge-name", '[[nic]]\nbridge = "br kvm; reboot"\n', ['nic[0].bridge = "br kvm; reboot": expected an interface name']),
    ("nic-bridge-long", '[[nic]]\nbridge = "a-very-long-bridge-name"\n', ['nic[0].bridge = "a-very-long-bridge-name": longer than 15 characters']),
    ("user-with-bridge", '[[nic]]\nmode = "user"\nbridge = "br0"\n', ['nic[0].bridge: a mode = "user" NIC has no bridge']),
    ("queues-model", 'cpus = 4\n[[nic]]\nmodel = "e1000"\nqueues = 2\n',
     ['nic[0].queues: multiqueue needs model = "virtio" and mode = "bridge"']),
    ("queues-cpus", 'cpus = 2\n[[nic]]\nqueues = 4\n', ["nic[0].queues: 4 queues for 2 vCPUs"]),
    ("escape", '[console]\nescape = "q"\n', ['console.escape = "q": expected a control key']),
    ("serial", '[console]\nserial = 1\n', ["console.serial = 1: expected true or false"]),
    ("vnc", '[display]\nvnc = "0.0.0.0:1,password=on"\n', ['display.vnc = "0.0.0.0:1,password=on": expected']),
    ("stop-timeout", '[stop]\ntimeout = "soon"\n', ['stop.timeout = "soon": expected a duration']),
    ("stop-timeout-zero", "[stop]\ntimeout = 0\n", ["stop.timeout = 0: must be between 1s and 1440min"]),
    ("cpu-weight", "[resources]\ncpu_weight = 0\n", ["resources.cpu_weight = 0: must be between 1 and 10000"]),
    ("cpu-affinity", '[resources]\ncpu_affinity = "3-1"\n', ['resources.cpu_affinity = "3-1": bad CPU range']),
    ("extra-args-string", '[qemu]\nextra_args = "-snapshot"\n', ['qemu.extra_args = "-snapshot": expected a list']),
    ("extra-args-int", "[qemu]\nextra_args = [1]\n", ["qemu.extra_args = [1]: item 0: expected a string"]),
    ("uuid", 'uuid = "not-a-uuid"\n', ['uuid = "not-a-uuid": expected a UUID']),
    ("description-newline", 'description = "a\\nb"\n', ['description = "a\\nb": must not contain newlines']),
]


@pytest.mark.parametrize("case,toml,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_guest(conf, case, toml, expected):
    path = conf.write("guests/g.toml", toml)
    before = sorted(conf.paths.config_dir.parent.rglob("*"))
    with pytest.raises(KvmagentError) as exc:
        conf.guest()
    assert sorted(conf.paths.config_dir.parent.rglob("*")) == before  # nothing written
    err = exc.value
    assert err.status == ExitStatus.CONFIG
    for text in expected:
        assert text.replace("{file}", str(path)) in str(err), (str(err), text)
    assert str(path) in err.message


def test_the_cases_are_30_different_ones():
    """At least 30 cases, each a different input with its own id, and each
    expecting a message that names a key of that input (a TOML syntax error:
    the line)."""
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES), "two cases share an id"
    assert len({c[1] for c in CASES}) == len(CASES), "two cases test the same input"
    for case, toml, expected in CASES:
        assert expected, case
        keys = {word.strip("[]") for line in toml.splitlines()
                for word in [line.partition("=")[0].strip()] if word}
        said = " ".join(expected)
        assert any(key.split(".")[-1] in said for key in keys) or "line 1" in said, \
            (case, keys, expected)


def test_error_in_dropin_names_the_dropin(conf):
    conf.write("guests/g.toml", "cpus = 2\n")
    dropin = conf.write("guests/g.toml.d/50-oops.toml", 'cpus = "four"\n')
    with pytest.raises(KvmagentError) as exc:
        conf.guest()
    assert exc.value.message.startswith(f'{dropin}: cpus = "four"')


def test_bad_host_config(conf):
    host = conf.write("kvmagent.toml", 'tcg_fallback = "yes"\n')
    conf.write("guests/g.toml", "")
    with pytest.raises(KvmagentError) as exc:
        conf.guest()
    assert exc.value.message == f'{host}: tcg_fallback = "yes": expected true or false'
    assert exc.value.status == ExitStatus.CONFIG


def test_unknown_host_key(conf):
    host = conf.write("kvmagent.toml.d/10-x.toml", 'bridg = "br0"\n')
    conf.write("guests/g.toml", "")
    with pytest.raises(KvmagentError) as exc:
        conf.guest()
    assert exc.value.message == f"{host}: unknown key 'bridg'"
    assert exc.value.hint == "did you mean 'bridge'?"


@pytest.mark.parametrize("name", ["Arkani", "a_b", "a.b", "-x"])
def test_bad_guest_names(conf, name):
    # typed on the command line: no such guest can exist (8)
    with pytest.raises(KvmagentError) as exc:
        conf.guest(name)
    assert exc.value.status == ExitStatus.UNKNOWN_GUEST
    assert repr(name) in exc.value.message
    # a file with that name: a configuration error (6) naming the file
    path = conf.write(f"guests/{name}.toml", "")
    with pytest.raises(KvmagentError) as exc:
        conf.guest(name)
    assert exc.value.status == ExitStatus.CONFIG
    assert exc.value.message.startswith(f"{path}: the guest name {name!r}")


def test_path_traversal_name(conf):
    conf.write("x.toml", "")  # what guests/../x.toml would be
    with pytest.raises(KvmagentError) as exc:
        conf.guest("../x")
    assert exc.value.status == ExitStatus.UNKNOWN_GUEST
    assert exc.value.message == "invalid guest name '../x'"


def test_unknown_guest(conf):
    with pytest.raises(KvmagentError) as exc:
        conf.guest("nosuch")
    assert exc.value.status == ExitStatus.UNKNOWN_GUEST
    assert "unknown guest 'nosuch'" in exc.value.message


def test_cross_guest_duplicates(conf):
    from kvmagent.config.guests import check_unique
    conf.write("guests/a.toml", '[[nic]]\nmac = "52:54:00:00:00:01"\n[[disk]]\npath = "/x"\n')
    b = conf.write("guests/b.toml", '[[nic]]\nmac = "52:54:00:00:00:01"\n')
    c = conf.write("guests/c.toml", '[[disk]]\npath = "/x"\n')
    with pytest.raises(KvmagentError) as exc:
        check_unique([conf.guest("a"), conf.guest("b")])
    assert exc.value.message.startswith(f'{b}: nic[0].mac = "52:54:00:00:00:01" is also a MAC of guest a')
    with pytest.raises(KvmagentError) as exc:
        check_unique([conf.guest("a"), conf.guest("c")])
    assert exc.value.message.startswith(f'{c}: disk[0].path = "/x" is also disk[0] of guest a')
