"""The documentation describes exactly the keys and exit statuses the code
has: a renamed or added key without docs fails here."""

from pathlib import Path

from kvmagent.errors import EXIT_STATUS_HELP, ExitStatus
from kvmagent.config.schema import BRIDGE_KEYS, GUEST_ARRAYS, GUEST_TABLES, GUEST_TOP, HOST_KEYS

REPO = Path(__file__).resolve().parents[2]
MAN5 = (REPO / "docs" / "kvmagent.toml.5.md").read_text()


def _sections():
    yield "# HOST DEFAULTS", HOST_KEYS
    yield "### top level", GUEST_TOP
    for name, keys in GUEST_TABLES.items():
        yield f"### [{name}]", keys
    for name, keys in GUEST_ARRAYS.items():
        yield f"### [[{name}]]", keys
    yield "# BRIDGES", BRIDGE_KEYS


def test_every_key_documented_with_type_and_default():
    for heading, keys in _sections():
        start = MAN5.index(heading)
        nxt = MAN5.find("\n#", start + len(heading))
        body = MAN5[start:nxt if nxt > 0 else None]
        rows = [line for line in body.splitlines() if line.startswith("| `")]
        assert len(rows) == len(keys), heading
        for key in keys.values():
            default = key.default or "(not set)"
            row = f"| `{key.name}` | {key.type} | {default} |"
            assert any(r.startswith(row) for r in rows), (heading, row)


def test_exit_statuses_documented_everywhere():
    readme = (REPO / "README.md").read_text()
    for status in ExitStatus:
        assert f"  {int(status)}  " in EXIT_STATUS_HELP, status
        assert f"| {int(status)} |" in readme, status


def test_shipped_host_config_lists_every_key_with_its_default():
    text = (REPO / "docs" / "examples" / "kvmagent.toml").read_text()
    for key in HOST_KEYS.values():
        assert f"#{key.name} = {key.default}\n" in text, key.name


def test_shipped_example_guest_is_valid(conf):
    sample = (REPO / "docs" / "examples" / "example.toml.sample").read_text()
    conf.write("guests/arkani.toml", sample)
    conf.write("kvmagent.toml", (REPO / "docs" / "examples" / "kvmagent.toml").read_text())
    guest = conf.guest("arkani")
    assert guest.cpus == 2 and guest.nics[0].bridge == "br-kvm"
    # the sample itself is not a guest: only *.toml files are
    from kvmagent.config.guests import guest_names
    conf.write("guests/example.toml.sample", sample)
    assert guest_names(conf.paths) == ["arkani"]


def test_readme_layout_names_every_module():
    """A newcomer finds every module of kvmagent/ in README's Layout, and
    what it is for."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("\n## Layout\n")
    end = readme.find("\n## ", start + 1)
    layout = readme[start:end if end > 0 else None]
    missing = [str(p.relative_to(REPO)) for p in sorted((REPO / "kvmagent").rglob("*.py"))
               if p.stem != "__init__" and f"`{p.stem}`" not in layout]
    missing += [f"{p.parent.name}/" for p in sorted((REPO / "kvmagent").glob("*/__init__.py"))
                if f"`{p.parent.name}/`" not in layout]
    assert not missing, f"README's Layout does not name: {', '.join(missing)}"
