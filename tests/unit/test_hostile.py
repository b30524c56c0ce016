"""Hostile input: names and values chosen to break out of where they go
(paths, unit names, taps, QEMU options), files that others can change, and
files built to hurt the parser.  Each is refused with a message naming the
file, the key and the value, a documented exit status, and leaves nothing
behind.  (The property-based tests are in test_hypothesis.py.)"""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from kvmagent.config import layers as config
from kvmagent import names
from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.config.guests import check_unique, load_guest, load_host_config
from kvmagent.host.hostcheck import check_host, host_memory
from kvmagent.config.model import Accel
from kvmagent.render.qemu import HostFacts, Sockets, qemu_argv
from kvmagent.host.qemucaps import QemuCaps, parse_transcript

KVM = HostFacts(Accel.KVM)


def recorded_qemu(qemu: Path) -> QemuCaps:
    """What QEMU 7.2 answered (test_qemucaps.py): no QEMU run, no cache."""
    return parse_transcript(str(qemu), (Path(__file__).parent / "data" / "qemucaps"
                                        / "qemu-7.2.qmp").read_text())


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ROOT with its type, size and mtime: what 'leaves
    nothing behind' is checked against."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[p] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


def refused(conf, name: str = "g", status: ExitStatus = ExitStatus.CONFIG) -> KvmagentError:
    """Load guest NAME expecting a refusal with STATUS; nothing may change."""
    root = conf.paths.config_dir.parent
    before = snapshot(root)
    with pytest.raises(KvmagentError) as exc:
        conf.guest(name)
    assert exc.value.status == status, str(exc.value)
    assert snapshot(root) == before
    assert not conf.paths.state_dir.exists() and not conf.paths.runtime_dir.exists()
    return exc.value


def argv_of(conf, name: str = "g") -> list[str]:
    host = load_host_config(conf.paths)
    return qemu_argv(load_guest(conf.paths, name, host), host, KVM,
                     Sockets.in_dir(conf.paths.guest_runtime(name)))


# -- guest names ----------------------------------------------------------------

HOSTILE_NAMES = ["../x", "a/b", "-rf", "a b", "my guest", "gäst", "ｇ", "g\n", "g\t", "g\x00",
                 "a" * 65, "a" * 200, "", ".", "..", "a--b", "A", "g.toml", "kvm@g", "g\u200b",
                 "-", "g-", "\udcff"]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=[repr(n) for n in HOSTILE_NAMES])
def test_hostile_name_typed(conf, name):
    """A name given on the command line that cannot be a guest: exit 8,
    naming it, never looked up outside guests/ ("../x" is etc/x.toml)."""
    conf.write("x.toml", "")  # what ../x would reach
    err = refused(conf, name, ExitStatus.UNKNOWN_GUEST)
    assert repr(name) in err.message and err.hint == names.GUEST_NAME_RULE


FILE_NAMES = [n for n in HOSTILE_NAMES if n and "/" not in n and "\x00" not in n
              and n not in (".", "..") and n != "\udcff"]


@pytest.mark.parametrize("name", FILE_NAMES, ids=[repr(n) for n in FILE_NAMES])
def test_hostile_name_as_file(conf, name):
    """guests/NAME.toml exists but NAME cannot be a guest: a configuration
    error (6) naming the file."""
    path = conf.write(f"guests/{name}.toml", "")
    err = refused(conf, name)
    assert err.message.startswith(f"{path}: the guest name {name!r} (from the file name)")


def test_trailing_newline_is_not_a_valid_name():
    # "$" in a regex matches before a trailing newline: this was accepted.
    assert not names.valid_guest_name("g\n")
    assert names.valid_guest_name("a" * 64) and not names.valid_guest_name("a" * 65)


def _colliding_long_names() -> tuple[str, str]:
    """Two 20-character names whose tap names collide: same 4-character
    prefix and the same 4 hex digits of hash (a birthday search, ~300 tries)."""
    seen: dict[str, str] = {}
    for i in range(100000):
        name = f"abcdefghijklmn-{i:05d}"
        h = hashlib.sha256(name.encode()).hexdigest()[:4]
        if h in seen:
            return seen[h], name
        seen[h] = name
    raise AssertionError("no collision found")


def test_tap_names_collide_after_truncation(conf):
    a, b = _colliding_long_names()
    assert names.tap_name(a, 0) == names.tap_name(b, 0)
    conf.write(f"guests/{a}.toml", "[[nic]]\n")
    conf.write(f"guests/{b}.toml", "[[nic]]\n")
    guests = [conf.guest(a), conf.guest(b)]
    with pytest.raises(KvmagentError) as exc:
        check_unique(guests)
    assert exc.value.status == ExitStatus.CONFIG
    assert f"tap name {names.tap_name(a, 0)} of nic[0] is also used by guest {a}" in str(exc.value)


def test_short_name_that_looks_like_a_hashed_tap(conf):
    long = "abcdefghijklmnop"
    tap = names.tap_name(long, 0)  # kvm-abcd-HHHH-0
    short = tap[len("kvm-"):-len("-0")]
    assert names.valid_guest_name(short) and names.tap_name(short, 0) == tap
    conf.write(f"guests/{long}.toml", "[[nic]]\n")
    conf.write(f"guests/{short}.toml", "[[nic]]\n")
    with pytest.raises(KvmagentError) as exc:
        check_unique([conf.guest(long), conf.guest(short)])
    assert exc.value.status == ExitStatus.CONFIG and "is also used by guest" in str(exc.value)


def test_derived_names_never_escape():
    """Unit, scope and machine names are the guest name unescaped; systemd
    would escape '-' only in path instances (%I), and kvm@.service uses %i."""
    unit = (Path(__file__).parents[2] / "units" / "kvm@.service").read_text()
    assert "%I" not in unit and "run %i" in unit
    for name in ("a", "a-b", "a" * 64, "0-9"):
        assert names.service_unit(name) == f"kvm@{name}.service"
        assert names.scope_unit(name) == f"kvm-{name}.scope"
        assert len(names.tap_name(name, 15).encode()) <= names.IFNAMSIZ


# -- values that reach QEMU options -------------------------------------------

def _opt(argv: list[str], option: str, startswith: str = "") -> str:
    return next(v for o, v in zip(argv, argv[1:]) if o == option and v.startswith(startswith))


def test_commas_and_equals_in_every_string_that_reaches_qemu(conf):
    conf.write("kvmagent.toml", 'qemu = "/opt/q,x=y/qemu"\n')
    conf.write("guests/g.toml", """\
        [kernel]
        image = "/k,format=qcow2,x=y"
        initrd = "/i,if=virtio"
        cmdline = "console=ttyS0,115200 a=b,c"
        [[disk]]
        path = "/d,file=/etc/shadow,readonly=off"
        """)
    argv = argv_of(conf)
    assert argv[0] == "/opt/q,x=y/qemu"  # argv[0] is a file name, not an option
    # -kernel, -initrd and -append take their argument as it is
    assert _opt(argv, "-kernel") == "/k,format=qcow2,x=y"
    assert _opt(argv, "-initrd") == "/i,if=virtio"
    assert _opt(argv, "-append") == "console=ttyS0,115200 a=b,c"
    assert _opt(argv, "-drive").startswith("file=/d,,file=/etc/shadow,,readonly=off,format=raw,")
    conf.write("guests/g.toml", '[display]\nvnc = "unix:/run/v.sock"\n')
    assert _opt(argv_of(conf), "-vnc") == "unix:/run/v.sock"


@pytest.mark.parametrize("toml,expected", [
    ('[display]\nvnc = "unix:/run/a,password=on"\n', 'display.vnc = "unix:/run/a,password=on"'),
    ('[display]\nvnc = "unix:/run/a=b"\n', 'display.vnc = "unix:/run/a=b"'),
    ('[display]\nvnc = "127.0.0.1:1,share=ignore"\n', "display.vnc"),
    ('machine = "q35,accel=tcg"\n', 'machine = "q35,accel=tcg"'),
    ('machine = "q35=x"\n', 'machine = "q35=x"'),
    ('[[nic]]\nbridge = "br0,vhost=on"\n', 'nic[0].bridge = "br0,vhost=on"'),
    ('[[nic]]\nmac = "52:54:00:12:34:56,id=x"\n', "nic[0].mac"),
    ('uuid = "6f1d5f6e-2b0c-4f3e-9a57-6b766d616765,x"\n', "uuid"),
], ids=["vnc-comma", "vnc-equals", "vnc-addr-comma", "machine-comma", "machine-equals",
        "bridge", "mac", "uuid"])
def test_option_strings_that_cannot_be_quoted_are_refused(conf, toml, expected):
    path = conf.write("guests/g.toml", toml)
    err = refused(conf)
    assert err.message.startswith(f"{path}: {expected}"), err.message


STRING_KEYS = [("", "description"), ("", "machine"), ("", "uuid"), ("kernel", "image"),
               ("kernel", "initrd"), ("kernel", "cmdline"), ("display", "vnc"),
               ("[disk]", "path"), ("[nic]", "bridge"), ("[nic]", "mac")]


@pytest.mark.parametrize("char", ["\\n", "\\r", "\\u0000", "\\u001b", "\\u007f", "\\u0085"],
                         ids=["newline", "cr", "nul", "esc", "del", "nel"])
@pytest.mark.parametrize("table,key", STRING_KEYS, ids=[f"{t}.{k}" for t, k in STRING_KEYS])
def test_control_characters_in_every_string(conf, table, key, char):
    header = f"[{table}]\n" if table else ""
    if table == "kernel" and key != "image":
        header += 'image = "/k"\n'
    path = conf.write("guests/g.toml", f'{header}{key} = "/a{char}-drive"\n')
    err = refused(conf)
    shown = f"{table.strip('[]')}[0].{key}" if table.startswith("[") else (
        f"{table}.{key}" if table else key)
    assert err.message.startswith(f'{path}: {shown} = "/a'), err.message
    assert "\n" not in err.message  # the message itself stays one line


@pytest.mark.parametrize("key", ["qemu", "bridge", "machine"])
def test_control_characters_in_host_strings(conf, key):
    host = conf.write("kvmagent.toml", f'{key} = "/x\\n-y"\n')
    conf.write("guests/g.toml", "")
    err = refused(conf)
    assert err.message.startswith(f'{host}: {key} = "/x\\n-y": ')


NUMBERS = [
    ("cpus = 0\n", "cpus = 0: must be between 1 and 255"),
    ("cpus = 10000\n", "cpus = 10000: must be between 1 and 255"),
    ("cpus = -1\n", "cpus = -1: must be between 1 and 255"),
    ("cpus = 99999999999999999999999999999999\n", "cpus = 99999999999999999999999999999999: must"),
    ("cpus = 1e400\n", "cpus = Infinity: expected an integer"),
    ("cpus = nan\n", "cpus = NaN: expected an integer"),
    ('memory = "-1G"\n', 'memory = "-1G": expected a size'),
    ('memory = "99999999999999999999T"\n', 'memory = "99999999999999999999T": must be between'),
    ('memory = "' + "9" * 5000 + 'M"\n', 'memory = "99999999'),
    ('memory = "1\u212a"\n', 'memory = "1\\u212a": expected a size'),  # KELVIN SIGN, was a KeyError
    ('memory = "\u0665G"\n', 'memory = "\\u0665G": expected a size'),  # ARABIC-INDIC FIVE
    ('memory = "1G\\n"\n', 'memory = "1G\\n": expected a size'),
    ("[stop]\ntimeout = " + "9" * 400 + "\n", "stop.timeout = 9999"),  # was an OverflowError
    ("[stop]\ntimeout = -5\n", "stop.timeout = -5: a duration cannot be negative"),
    ('[stop]\ntimeout = "' + "9" * 400 + 's"\n', 'stop.timeout = "9999'),
    ("[resources]\ntasks_max = 100000000000000000000\n",
     "resources.tasks_max = 100000000000000000000"),
    ("[resources]\ncpu_weight = -1\n", "resources.cpu_weight = -1: must be between"),
    ('[resources]\ncpu_affinity = "0-99999999999"\n', "resources.cpu_affinity"),  # was a hang
    ('[resources]\ncpu_affinity = "0-99999999"\n', "CPU numbers must be between 0 and 4095"),
    ("[resources]\ncpu_affinity = [-1]\n", "CPU numbers must be between 0 and 4095"),
    ("[resources]\ncpu_affinity = [100000000000000000000]\n", "CPU numbers must be between"),
    ("cpus = 2\n[[nic]]\nqueues = -1\n", "nic[0].queues = -1: must be between 1 and 16"),
    # was a TypeError:
    ('[console]\nescape = "^\u00df"\n', 'console.escape = "^\\u00df": expected a control key'),
]


@pytest.mark.parametrize("toml,expected", NUMBERS, ids=[str(i) for i in range(len(NUMBERS))])
def test_hostile_numbers(conf, toml, expected):
    path = conf.write("guests/g.toml", toml)
    start = time.monotonic()
    err = refused(conf)
    assert time.monotonic() - start < 1.0
    assert err.message.startswith(f"{path}: ") and expected in err.message, err.message
    assert len(err.message) < 400  # a 5000-digit value is shown cut


@pytest.mark.parametrize("toml,expected", [
    ('memory_overhead = "-256M"\n', 'memory_overhead = "-256M": expected a size'),
    ("stop_timeout = " + "9" * 400 + "\n", "stop_timeout = 9999"),
    ("device_timeout = -1\n", "device_timeout = -1: a duration cannot be negative"),
])
def test_hostile_host_numbers(conf, toml, expected):
    host = conf.write("kvmagent.toml", toml)
    conf.write("guests/g.toml", "")
    err = refused(conf)
    assert err.message.startswith(f"{host}: ") and expected in err.message, err.message


def test_memory_larger_than_the_host_is_a_host_check(conf):
    """Validation accepts up to 16T (the file may be meant for a bigger
    host); the host check at start refuses more than this host's RAM, exit 5."""
    path = conf.write("guests/g.toml", 'memory = "16T"\n')
    g = conf.guest()
    assert host_memory() < g.memory
    _, problems = check_host(g, load_host_config(conf.paths), kvm_probe=lambda: (True, ""),
                             caps_probe=recorded_qemu)
    mem = [p for p in problems if "memory" in p.message]
    assert len(mem) == 1 and mem[0].status == ExitStatus.HOST_NOT_READY
    assert mem[0].message.startswith(f'{path}: memory = "16T": more than this host\'s ')
    conf.write("guests/g.toml", 'memory = "16M"\n')
    _, problems = check_host(conf.guest(), load_host_config(conf.paths),
                             kvm_probe=lambda: (True, ""),
                             caps_probe=recorded_qemu)
    assert not [p for p in problems if "memory" in p.message]


def test_hostile_keys_are_shown_quoted_and_cut(conf):
    conf.write("guests/g.toml", '"a\\nb" = 1\n')
    err = refused(conf)
    assert "unknown key '\"a\\nb\"'" in err.message and "\n" not in err.message
    conf.write("guests/g.toml", f'{"k" * 100000} = 1\n')
    err = refused(conf)
    assert "unknown key" in err.message and len(err.message) < 400


def test_long_string_value_is_shown_cut(conf):
    conf.write("guests/g.toml", f'description = "{"x" * 500000}"\n')
    err = refused(conf)
    assert "longer than 256 characters" in err.message and len(err.message) < 400


# -- the files themselves -------------------------------------------------------

@pytest.mark.parametrize("toml,expected", [
    ("cpus = " + "[" * 100000 + "]" * 100000 + "\n", "nested more than 16 deep"),
    ("cpus = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n", "nested more than 16 deep"),
    ("a" + ".a" * 50000 + " = 1\n", "nested more than 16 deep"),
    ("[kernel" + ".a" * 50000 + "]\n", "nested more than 16 deep"),
    ("cpus = " + "9" * 5000 + "\n", "not valid TOML: Exceeds the limit"),
], ids=["arrays", "inline-tables", "dotted-keys", "table-header", "int-digits"])
def test_parser_bombs(conf, toml, expected):
    """Were RecursionError and ValueError tracebacks."""
    path = conf.write("guests/g.toml", toml)
    start = time.monotonic()
    err = refused(conf)
    assert time.monotonic() - start < 1.0
    assert err.message.startswith(f"{path}: ") and expected in err.message, err.message
    assert "sys.set_int_max_str_digits" not in err.message


def test_bridge_files_are_checked_too(conf):
    from kvmagent.cli.bridges import load_bridge
    path = conf.write("bridges/br0.toml", 'uplink = "eth0"\n')
    assert load_bridge(path) == {"name": "br0", "uplink": "eth0"}
    path.chmod(0o666)
    with pytest.raises(KvmagentError) as exc:
        load_bridge(path)
    assert exc.value.status == ExitStatus.CONFIG
    assert exc.value.message.startswith(f"{path}: refusing a configuration file")


@pytest.mark.parametrize("key", ["a", '"a"', "'a'"])
def test_megabyte_of_dotted_key_is_refused_quickly(conf, key):
    """tomllib's time grows with the square of a dotted key's length; the
    key is refused before tomllib sees it."""
    conf.write("guests/g.toml", key + f".{key}" * ((config.MAX_FILE_SIZE - 10) // 4) + " = 1\n")
    start = time.monotonic()
    assert "nested more than 16 deep" in refused(conf).message
    assert time.monotonic() - start < 1.0
    conf.write("guests/g.toml", "[[disk]]\npath = \"/a.b.c.d.e.f.g.h.i.j.k.l.m.n.o\"\n")
    assert conf.guest().disks[0].path == Path("/a.b.c.d.e.f.g.h.i.j.k.l.m.n.o")


def test_duplicate_keys_name_file_and_line(conf):
    path = conf.write("guests/g.toml", 'cpus = 1\nmemory = "1G"\ncpus = 2\n')
    err = refused(conf)
    assert err.message.startswith(f"{path}: not valid TOML: Cannot overwrite a value")
    assert "line 3" in err.message
    path = conf.write("guests/g.toml", '[kernel]\nimage = "/k"\n[kernel]\nimage = "/j"\n')
    assert "line 3" in refused(conf).message


def test_nul_byte_in_file(conf):
    path = conf.write("guests/g.toml", "cpus = 1\x00\n")
    err = refused(conf)
    assert err.message.startswith(f"{path}: not valid TOML") and "line 1" in err.message


def test_invalid_utf8_names_file_and_line(conf):
    path = conf.write("guests/g.toml", "")
    path.write_bytes(b'cpus = 1\ndescription = "caf\xe9"\n')
    err = refused(conf)
    assert err.message == f"{path}: not valid TOML: the file is not UTF-8 (byte 0xe9 at line 2)"


def test_large_file_refused_without_reading_it(conf, monkeypatch):
    path = conf.write("guests/g.toml", "")
    with path.open("r+b") as f:
        f.truncate(50 << 20)  # 50 MB (sparse)
    reads = []
    real_read = os.read
    monkeypatch.setattr(config.os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    start = time.monotonic()
    err = refused(conf)
    assert time.monotonic() - start < 0.5
    assert reads == []
    assert err.message == (f"{path}: {50 << 20} bytes; a configuration file may have at most "
                           f"{config.MAX_FILE_SIZE} bytes (1 MiB)")


def test_file_at_the_size_limit_is_read(conf):
    line = "# " + "x" * 1021 + "\n"  # 1 KiB
    conf.write("guests/g.toml", line * 1024)
    assert conf.guest().cpus == 1
    conf.write("guests/g.toml", line * 1024 + "\n")
    assert "at most 1048576 bytes" in refused(conf).message


def _alarm(seconds: int):
    def fail(*_):
        raise AssertionError("blocked on a special file")
    signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)


@pytest.mark.parametrize("where", ["guests/g.toml", "guests/g.toml.d/10-x.toml", "kvmagent.toml"])
def test_fifo_is_refused_without_blocking(conf, where):
    conf.write("guests/g.toml", "")
    path = conf.paths.config_dir / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    os.mkfifo(path, 0o644)
    _alarm(5)
    try:
        err = refused(conf)
    finally:
        signal.alarm(0)
    assert err.message == f"{path}: is not a regular file"


def test_symlink_to_a_device_is_refused(conf):
    (conf.paths.guests_dir / "g.toml").symlink_to("/dev/zero")
    _alarm(5)
    try:
        err = refused(conf)
    finally:
        signal.alarm(0)
    assert err.message.endswith("g.toml: is not a regular file")


# Symlinks: an admin may keep a guest's file in /srv (or a git checkout) and
# link it into guests/; that is allowed, with the ownership checks applied
# to the file the link points to.

def test_symlink_outside_config_dir_is_allowed(conf, tmp_path):
    srv = tmp_path / "srv"
    srv.mkdir()
    (srv / "web.toml").write_text("cpus = 3\n")
    (srv / "web.toml.d").mkdir()
    (conf.paths.guests_dir / "web.toml").symlink_to(srv / "web.toml")
    dropins = conf.paths.guests_dir / "web.toml.d"
    dropins.mkdir()
    (srv / "mem.toml").write_text('memory = "1G"\n')
    (dropins / "50-mem.toml").symlink_to(srv / "mem.toml")
    g = conf.guest("web")
    assert g.cpus == 3 and g.memory == 1 << 30
    assert g.origin["memory"] == str(dropins / "50-mem.toml")


def test_symlink_to_world_writable_file(conf, tmp_path):
    target = tmp_path / "evil.toml"
    target.write_text("cpus = 2\n")
    target.chmod(0o666)
    link = conf.paths.guests_dir / "g.toml"
    link.symlink_to(target)
    err = refused(conf)
    assert err.message == (f"{link} (a symlink to {target}): refusing a configuration file "
                           "that other users can change: it is world-writable (mode 0666)")
    assert err.hint == f"if the file is as you want it: chmod o-w {target}"


def test_dangling_symlinks(conf, tmp_path):
    link = conf.paths.guests_dir / "g.toml"
    link.symlink_to(tmp_path / "not-mounted-yet.toml")
    assert refused(conf).message == f"{link}: a symlink to a missing file"
    link.unlink()
    conf.write("guests/g.toml", "")
    dropin = conf.paths.guests_dir / "g.toml.d" / "10-x.toml"
    dropin.parent.mkdir()
    dropin.symlink_to(tmp_path / "gone.toml")
    assert refused(conf).message == f"{dropin}: a symlink to a missing file"


def test_hidden_dropins_are_ignored(conf, tmp_path):
    """Editors' lock files (.#10-x.toml, a dangling symlink) are not drop-ins."""
    conf.write("guests/g.toml", "")
    (conf.paths.guests_dir / "g.toml.d").mkdir()
    (conf.paths.guests_dir / "g.toml.d" / ".#10-x.toml").symlink_to("root@host.1234")
    (conf.paths.guests_dir / ".#g.toml").symlink_to("root@host.1234")
    assert conf.guest().cpus == 1


# -- ownership and permissions ----------------------------------------------------

@pytest.mark.parametrize("where", ["guests/g.toml", "guests/g.toml.d/10-x.toml",
                                   "kvmagent.toml", "kvmagent.toml.d/10-x.toml"])
def test_world_writable_files_are_refused(conf, where):
    conf.write("guests/g.toml", "")
    path = conf.write(where, "")
    path.chmod(0o646)
    err = refused(conf)
    assert err.message == (f"{path}: refusing a configuration file that other users can "
                           "change: it is world-writable (mode 0646)")
    assert err.hint == f"if the file is as you want it: chmod o-w {path}"


def _foreign(path: Path, monkeypatch) -> str:
    """Make PATH owned by another user: chown it when root, else make fstat
    say so for that file only.  Returns the expected owner text."""
    other = 65534 if os.geteuid() != 65534 else 4242
    if os.geteuid() == 0:
        os.chown(path, other, -1, follow_symlinks=False)
    else:
        ino, real_fstat = os.stat(path).st_ino, os.fstat

        def fstat(fd: int) -> os.stat_result:
            st = real_fstat(fd)
            if st.st_ino != ino:
                return st
            fields = list(st[:10])
            fields[4] = other  # st_uid
            return os.stat_result(fields)
        monkeypatch.setattr(config.os, "fstat", fstat)
    return config._owner(other)


@pytest.mark.parametrize("where", ["guests/g.toml", "guests/g.toml.d/10-x.toml",
                                   "kvmagent.toml"])
def test_files_owned_by_another_user_are_refused(conf, where, monkeypatch):
    conf.write("guests/g.toml", "")
    path = conf.write(where, "")
    owner = _foreign(path, monkeypatch)
    err = refused(conf)
    assert err.message.startswith(f"{path}: refusing a configuration file that other users can "
                                  f"change: it is owned by {owner}, not root")
    assert err.hint == f"if the file is as you want it: chown root: {path}"


def test_world_writable_directory_is_refused(conf):
    conf.write("guests/g.toml", "")
    guests = conf.paths.guests_dir
    guests.chmod(0o777)
    err = refused(conf)
    assert err.message == (f"{guests}/g.toml: refusing a configuration file in a directory "
                           f"that other users can change: {guests} is world-writable (mode 0777)")
    assert err.hint == f"chmod o-w {guests}"
    guests.chmod(0o1777)  # sticky, like /tmp: others cannot replace our files
    assert conf.guest().cpus == 1


def test_root_files_with_umask_022_are_fine(conf):
    """What the package and the test hosts install: root (or our own) files,
    0644, in 0755 directories."""
    old = os.umask(0o022)
    try:
        conf.write("kvmagent.toml", "")
        conf.write("guests/g.toml", "cpus = 2\n")
        conf.write("guests/g.toml.d/10-x.toml", 'memory = "1G"\n')
    finally:
        os.umask(old)
    g = conf.guest()
    assert (g.cpus, g.memory) == (2, 1 << 30)


def test_group_writable_is_the_admins_choice(conf):
    """Group-writable files are allowed (a group of admins may edit guests);
    only world-writable ones and other owners are refused."""
    conf.write("guests/g.toml", "").chmod(0o664)
    assert conf.guest().cpus == 1


def test_unreadable_file(conf, monkeypatch):
    path = conf.write("guests/g.toml", "")

    def denied(*a, **kw):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(config.os, "open", denied)
    assert refused(conf).message == f"{path}: cannot read: permission denied"


# -- the command line ---------------------------------------------------------------

def _cli(conf, *args: str):
    import subprocess
    import sys
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(Path(__file__).parents[2]),
           "KVMAGENT_CONFIG_DIR": str(conf.paths.config_dir),
           "KVMAGENT_STATE_DIR": str(conf.paths.state_dir),
           "KVMAGENT_RUNTIME_DIR": str(conf.paths.runtime_dir)}
    return subprocess.run([sys.executable, "-m", "kvmagent", *args], env=env, text=True,
                          capture_output=True, timeout=60)


def test_cli_refuses_hostile_input_and_writes_nothing(conf):
    bad_name = conf.write("guests/My Guest.toml", "")
    open_file = conf.write("guests/open.toml", "")
    open_file.chmod(0o666)
    conf.write("guests/bomb.toml", "a" + ".a" * 100000 + " = 1\n")
    conf.write("guests/ok.toml", "")
    root = conf.paths.config_dir.parent
    before = snapshot(root)
    r = _cli(conf, "validate")
    assert r.returncode == ExitStatus.CONFIG, r.stderr
    assert f"{bad_name}: the guest name 'My Guest' (from the file name) is not valid" in r.stderr
    assert f"{open_file}: refusing a configuration file" in r.stderr
    assert "nested more than 16 deep" in r.stderr and "ok: ok" in r.stdout
    for args, status in ((["show", "../ok"], ExitStatus.UNKNOWN_GUEST),
                         (["show", "a/b"], ExitStatus.UNKNOWN_GUEST),
                         (["show", "--", "-rf"], ExitStatus.UNKNOWN_GUEST),
                         (["show", "g\n"], ExitStatus.UNKNOWN_GUEST),
                         (["show", "open"], ExitStatus.CONFIG)):
        r = _cli(conf, *args)
        assert r.returncode == status, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert snapshot(root) == before
    # list shows the bad files as invalid; it writes only its cache of guest
    # facts (in the runtime directory), and that only for the good guest
    r = _cli(conf, "list", "--json")
    assert r.returncode == ExitStatus.OK and "Traceback" not in r.stderr, r.stderr
    import json
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["ok"]["state"] != "invalid"
    assert all(rows[n]["state"] == "invalid" for n in ("open", "bomb")), rows
    assert {p for p in snapshot(root) if p not in before} <= {
        str(root / "run"), str(root / "run" / "list-cache.json")}
