"""service_settings(): the shipped units/kvm@.service agrees with it, and it
converts to StartTransientUnit properties (no bus, no root; that pystemd
marshals them: tests/libs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvmagent.cli import control
from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.paths import Paths
from kvmagent.names import oneoff_unit
from kvmagent.render.service import INSTANCE, render_service, service_settings
from kvmagent.render.unitprops import props_for_dbus

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "units" / "kvm@.service"

# What units/kvm@.service may say that no transient service can or should
# (the one table to extend): whole sections, and single keys.
FILE_ONLY_SECTIONS = {"Install"}  # a transient unit is not enabled
FILE_ONLY_KEYS: set[str] = set()


def parse_unit(lines: list[str]) -> dict[str, list[str]]:
    """Unit-file lines -> key: the words of all its values, in order.  The
    same key on several lines adds up (After=, DeviceAllow=), as in systemd."""
    out: dict[str, list[str]] = {}
    section = None
    for line in lines:
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        if section in FILE_ONLY_SECTIONS or key in FILE_ONLY_KEYS:
            continue
        out.setdefault(key, []).extend(value.split())
    return out


def test_template_agrees_with_service_settings() -> None:
    shipped = parse_unit(UNIT.read_text().splitlines())
    generated = parse_unit(render_service(service_settings(INSTANCE)))
    assert shipped == generated, (
        "units/kvm@.service and kvmagent.render.service.service_settings() differ: a line added "
        "to one belongs in the other (COMMON), or in FILE_ONLY_* here")


def test_every_template_setting_has_a_dbus_type() -> None:
    props = props_for_dbus(service_settings(INSTANCE))
    assert set(props) >= {b"ExecStartEx", b"ExecStopPostEx", b"Type", b"RuntimeDirectory"}


def test_per_guest_service_as_dbus_properties() -> None:
    settings = service_settings("g", ["/usr/bin/python3", "-m", "kvmagent"],
                                environment=["PYTHONPATH=/src/kvmagent"])
    props = props_for_dbus(settings)
    assert props[b"Description"] == b"KVM guest g"
    assert props[b"ExecStartEx"] == [(b"/usr/bin/python3", [b"/usr/bin/python3", b"-m",
                                                            b"kvmagent", b"run", b"g"], [])]
    assert props[b"ExecStopPostEx"] == [(b"/usr/bin/python3", [b"/usr/bin/python3", b"-m",
                                                               b"kvmagent", b"stop-post", b"g"],
                                         [b"ignore-failure", b"privileged"])]
    assert props[b"RuntimeDirectory"] == [b"kvmagent/g"]
    assert props[b"RuntimeDirectoryMode"] == 0o750
    assert props[b"Environment"] == [b"PYTHONPATH=/src/kvmagent"]
    assert props[b"Type"] == b"notify" and props[b"NotifyAccess"] == b"main"
    assert props[b"KillMode"] == b"mixed" and props[b"Restart"] == b"on-failure"
    assert props[b"RestartUSec"] == 0
    assert props[b"OnFailure"] == [b"kvmagent-orphan@g.service"]
    assert props[b"TimeoutStartUSec"] == 300_000_000
    assert props[b"TimeoutStopUSec"] == 90_000_000
    assert props[b"WatchdogUSec"] == 30_000_000
    assert props[b"StartLimitIntervalUSec"] == 600_000_000
    assert props[b"StartLimitBurst"] == 5
    assert props[b"RestartPreventExitStatus"] == ([6, 8], [])
    assert props[b"TasksMax"] == 1024
    assert props[b"Before"] == [b"machines.target"]
    assert (b"/dev/vhost-net", b"rw") in props[b"DeviceAllow"]
    assert b"CollectMode" not in props and b"Conflicts" not in props


def test_oneoff_service() -> None:
    settings = service_settings("g", ["/usr/bin/kvmagent"], guest_file="/root/g.toml")
    props = props_for_dbus(settings)
    assert props[b"Description"] == b"KVM guest g (one-off, /root/g.toml)"
    assert props[b"ExecStartEx"][0][1] == [b"/usr/bin/kvmagent", b"run", b"--file",
                                         b"/root/g.toml", b"g"]
    assert props[b"ExecStartEx"][0][2] == [b"no-env-expand"]  # a "$" in the path stays
    assert props[b"CollectMode"] == b"inactive-or-failed"
    assert props[b"Conflicts"] == [b"kvm@g.service"]
    # Before= given twice adds up, as in a unit file
    assert props[b"Before"] == [b"machines.target", b"kvm@g.service"]
    assert oneoff_unit("g") == "kvm-oneoff@g.service"
    assert "Conflicts=kvm@g.service" in render_service(settings)


def test_render_durations_and_modes() -> None:
    lines = render_service([("RestartSec", 2), ("TimeoutStartSec", 300), ("TimeoutStopSec", 90),
                            ("RuntimeDirectoryMode", 0o750), ("RestartPreventExitStatus", [6, 8]),
                            ("ExecStopPost", ["-+/usr/bin/kvmagent", "stop-post", "%i"])])
    assert lines == ["RestartSec=2s", "TimeoutStartSec=5min", "TimeoutStopSec=90s",
                     "RuntimeDirectoryMode=0750", "RestartPreventExitStatus=6 8",
                     "ExecStopPost=-+/usr/bin/kvmagent stop-post %i"]


@pytest.mark.parametrize("setting, expect", [
    (("ExecStopPost", ["-+/usr/bin/kvmagent", "stop-post", "g"]),
     {b"ExecStopPostEx": [(b"/usr/bin/kvmagent", [b"/usr/bin/kvmagent", b"stop-post", b"g"],
                           [b"ignore-failure", b"privileged"])]}),
    (("ExecStart", ["/usr/bin/kvmagent", "run", "g"]),
     {b"ExecStartEx": [(b"/usr/bin/kvmagent", [b"/usr/bin/kvmagent", b"run", b"g"], [])]}),
    (("WatchdogSec", 0.5), {b"WatchdogUSec": 500_000}),
    (("StartLimitBurst", 0), {b"StartLimitBurst": 0}),
])
def test_service_conversions(setting: tuple[str, Any], expect: dict[bytes, Any]) -> None:
    assert props_for_dbus([setting]) == expect


@pytest.mark.parametrize("setting", [
    ("ExecStart", ["kvmagent", "run", "g"]),  # not an absolute path
    ("ExecStart", ["--/usr/bin/kvmagent", "run", "g"]),  # a prefix twice
    ("ExecStart", []),
    ("RestartPreventExitStatus", [256]),
    ("RestartPreventExitStatus", []),
    ("RuntimeDirectoryMode", -1),
    ("RestartSec", -2),
    ("RestartSec", "2s"),
    ("StartLimitBurst", True),
])
def test_bad_service_values_name_the_setting(setting: tuple[str, Any]) -> None:
    with pytest.raises(KvmagentError, match=f"bad unit setting {setting[0]}="):
        props_for_dbus([setting])


def test_transient_command_runs_this_checkout(tmp_path: Path) -> None:
    import kvmagent
    home = Path(kvmagent.__file__).resolve().parent.parent  # the checkout, or pybuild's
    command, env = control.kvmagent_command(Paths.from_env({}))
    assert command[1:] == ["-m", "kvmagent"] and Path(command[0]).is_absolute()
    assert env == [f"PYTHONPATH={home}"]
    relocated = Paths.from_env({"KVMAGENT_CONFIG_DIR": str(tmp_path)})
    assert control.kvmagent_command(relocated)[1] == [f"PYTHONPATH={home}",
                                                      f"KVMAGENT_CONFIG_DIR={tmp_path}"]


def test_start_needs_name_or_file(conf: Any) -> None:
    from kvmagent.cli.parser import build_parser
    for argv in (["start"], ["start", "g", "--transient", "g.toml"]):
        args = build_parser().parse_args(argv)
        with pytest.raises(KvmagentError) as info:
            control.cmd_start(args, conf.paths)
        assert info.value.status == ExitStatus.USAGE


@pytest.mark.parametrize("file, text, message", [
    ("one.toml", None, "one.toml: no such file"),
    ("one.conf", 'memory = "1G"\n', "one.conf: a guest file is named NAME.toml"),
    ("one.toml", 'cpus = "two"\n', 'one.toml: cpus = "two": expected an integer'),
    ("One_1.toml", "", "guest name 'One_1' is not valid"),
])
def test_oneoff_bad_file_fails_before_systemd(conf: Any, tmp_path: Path, file: str,
                                              text: str | None, message: str) -> None:
    """Exit 6 and nothing made: the file is checked before any D-Bus call
    (there is no system bus here to call)."""
    from kvmagent.cli.parser import build_parser
    path = tmp_path / file
    if text is not None:
        path.write_text(text)
    args = build_parser().parse_args(["start", "--transient", str(path)])
    with pytest.raises(KvmagentError) as info:
        control.cmd_start(args, conf.paths)
    assert info.value.status == ExitStatus.CONFIG
    assert message in info.value.message


def test_oneoff_guest_loads_from_its_file_with_dropins(conf: Any, tmp_path: Path) -> None:
    from kvmagent.config.guests import load_guest_file, load_host_config
    (tmp_path / "quick.toml").write_text('memory = "1G"\n[[nic]]\n')
    (tmp_path / "quick.toml.d").mkdir()
    (tmp_path / "quick.toml.d" / "10-more.toml").write_text("cpus = 2\n")
    guest = load_guest_file(tmp_path / "quick.toml", load_host_config(conf.paths))
    assert (guest.name, guest.cpus, guest.memory) == ("quick", 2, 1 << 30)
    assert guest.nics[0].tap == "kvm-quick-0"  # the same names as a defined guest


def test_ip_sockets_only_for_guests_that_need_them(conf, tmp_path: Path) -> None:
    """VNC on TCP or user-mode networking: AF_INET/AF_INET6 for that guest
    (the generator's drop-in, or the transient unit's setting); nobody else."""
    from kvmagent.cli.generator import DROPIN, generate
    from kvmagent.config.guests import load_guest, load_host_config
    from kvmagent.render.service import needs_inet
    conf.write("guests/plain.toml", "[[nic]]\n")
    conf.write("guests/vnc.toml", '[display]\nvnc = "127.0.0.1:1"\n')
    conf.write("guests/unixvnc.toml", '[display]\nvnc = "unix:/run/kvmagent/unixvnc/vnc"\n')
    conf.write("guests/usernet.toml", '[[nic]]\nmode = "user"\n')
    conf.write("guests/broken.toml", 'cpus = "two"\n')
    host = load_host_config(conf.paths)
    wants = {n: needs_inet(load_guest(conf.paths, n, host))
             for n in ("plain", "vnc", "unixvnc", "usernet")}
    assert wants == {"plain": False, "vnc": True, "unixvnc": False, "usernet": True}
    out = tmp_path / "generator"
    assert generate(conf.paths, out) == ["usernet", "vnc"]
    dropin = (out / "kvm@vnc.service.d" / DROPIN).read_text()
    assert "RestrictAddressFamilies=AF_INET AF_INET6" in dropin
    assert sorted(p.name for p in out.iterdir()) == ["kvm@usernet.service.d", "kvm@vnc.service.d"]
    families = dict(service_settings("vnc", inet=True))["RestrictAddressFamilies"]
    assert families == ["AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"]
    assert props_for_dbus(service_settings("vnc", inet=True))[b"RestrictAddressFamilies"] == (
        True, [b"AF_UNIX", b"AF_NETLINK", b"AF_INET", b"AF_INET6"])
    assert dict(service_settings("plain"))["RestrictAddressFamilies"] == ["AF_UNIX", "AF_NETLINK"]


def test_service_tasks_max_allows_qemu_before_it_is_in_its_scope() -> None:
    """QEMU starts in the service's cgroup and makes its vCPU threads (and
    its I/O thread pool, up to 64) before the supervisor has moved it into
    kvm-NAME.scope.  The test host does not enforce TasksMax= (its pids
    controller is not delegated), so this is checked here: the most vCPUs
    the configuration allows must fit."""
    from kvmagent.config import schema
    most = int(schema.GUEST_TOP["cpus"].type.rpartition("-")[2])  # "integer 1-255"
    (line,) = [line for line in (REPO / "units" / "kvm@.service").read_text().splitlines()
               if line.startswith("TasksMax=")]  # exactly one: systemd's default is too low
    assert int(line.partition("=")[2]) >= most + 64 + 16
    assert dict(service_settings("g"))["TasksMax"] >= most + 64 + 16
