"""Drop-in semantics: lexical order, later wins, tables merge key by key,
arrays of tables are replaced whole, and every value knows its file."""

from pathlib import Path

from kvmagent.config.model import Accel, Bus, Cache, NicMode, OnPoweroff


def test_defaults(conf):
    conf.write("guests/g.toml", "")
    g = conf.guest()
    assert (g.cpus, g.memory, g.machine, g.accel) == (1, 512 << 20, "pc", Accel.AUTO)
    assert g.on_poweroff is OnPoweroff.STOP
    assert g.disks == () and g.nics == ()
    assert g.stop_timeout == 90 and g.console.serial and g.console.escape == "^]"
    assert g.description == "KVM guest g"
    assert g.origin["cpus"] == "default"


def test_dropins_merge_in_lexical_order(conf):
    main = conf.write("guests/g.toml", """
        cpus = 1
        memory = "1G"
        [stop]
        timeout = "30s"
        [console]
        escape = "^Q"
        [[disk]]
        path = "/a"
        [[disk]]
        path = "/b"
    """)
    conf.write("guests/g.toml.d/20-more.toml", """
        cpus = 4
        [stop]
        timeout = "2min"
    """)
    d10 = conf.write("guests/g.toml.d/10-disk.toml", """
        cpus = 2
        [[disk]]
        path = "/c"
        bus = "ide"
    """)
    conf.write("guests/g.toml.d/README", "not toml, ignored")
    d20 = conf.paths.config_dir / "guests/g.toml.d/20-more.toml"
    g = conf.guest()
    assert g.cpus == 4 and g.origin["cpus"] == str(d20)
    assert g.memory == 1 << 30 and g.origin["memory"] == str(main)
    assert g.stop_timeout == 120 and g.origin["stop.timeout"] == str(d20)
    # tables merge key by key: escape stays from the main file
    assert g.console.escape == "^Q" and g.origin["console.escape"] == str(main)
    # arrays of tables are replaced whole
    assert [str(d.path) for d in g.disks] == ["/c"]
    assert g.disks[0].bus is Bus.IDE and g.origin["disk[0].bus"] == str(d10)
    assert g.disks[0].cache is Cache.AUTO


def test_host_defaults_apply_and_are_attributed(conf):
    host = conf.write("kvmagent.toml", 'bridge = "br0"\naccel = "tcg"\nstop_timeout = "5min"\n')
    conf.write("kvmagent.toml.d/50-local.toml", 'machine = "q35"\n')
    conf.write("guests/g.toml", "[[nic]]\n[[nic]]\nmode = \"user\"\n")
    g = conf.guest()
    assert g.nics[0].bridge == "br0" and g.origin["nic[0].bridge"] == str(host)
    assert g.nics[1].mode is NicMode.USER and g.nics[1].bridge is None
    assert g.accel is Accel.TCG and g.origin["accel"] == str(host)
    assert g.stop_timeout == 300
    assert g.machine == "q35"
    assert g.origin["machine"].endswith("50-local.toml")


def test_guest_overrides_host(conf):
    conf.write("kvmagent.toml", 'accel = "tcg"\n')
    conf.write("guests/g.toml", 'accel = "kvm"\n[stop]\ntimeout = 10\n')
    g = conf.guest()
    assert g.accel is Accel.KVM and g.stop_timeout == 10


def test_stable_macs_and_taps(conf):
    conf.write("guests/g.toml", "[[nic]]\n[[nic]]\n")
    g = conf.guest()
    assert g.nics[0].mac != g.nics[1].mac
    assert [n.tap for n in g.nics] == ["kvm-g-0", "kvm-g-1"]
    assert conf.guest().nics == g.nics


def test_no_files_written(conf, tmp_path: Path):
    conf.write("guests/g.toml", "cpus = 2\n")
    before = sorted(p for p in tmp_path.rglob("*"))
    conf.guest()
    assert sorted(p for p in tmp_path.rglob("*")) == before
