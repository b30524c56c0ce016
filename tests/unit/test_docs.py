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


def test_readme_import_example_is_the_real_output():
    """README's "Coming from kvm scripts or from Xen": the seed's arkani
    script, and what `kvmagent import kvm-script` prints for it, to the
    letter."""
    import re

    from kvmagent.foreign.kvmscript import import_kvm_script
    readme = (REPO / "README.md").read_text()
    start = readme.index("\n## Coming from kvm scripts or from Xen\n")
    section = readme[start:readme.index("\n## ", start + 1)]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    script = (REPO / "tests" / "data" / "import" / "kvm-scripts" / "arkani.bash").read_text()
    assert ("sh", script) in blocks
    imported = import_kvm_script(script, "kvm-server.bash", read=lambda path: None)
    assert ("toml", imported.toml) in blocks
    command = next(b for kind, b in blocks if b.startswith("$ kvmagent import kvm-script"))
    assert command.splitlines()[1:] == [f"kvmagent: arkani: to do: {w}"
                                        for w in imported.warnings]


def test_every_command_in_the_man_page():
    """kvmagent(1) has every command of the parser in its SYNOPSIS and its
    COMMANDS, with the command's options."""
    from kvmagent.cli.parser import build_parser
    man1 = (REPO / "docs" / "kvmagent.1.md").read_text()
    synopsis = man1[man1.index("# SYNOPSIS"):man1.index("# DESCRIPTION")]
    commands = man1[man1.index("# COMMANDS"):man1.index("\n# ", man1.index("# COMMANDS") + 1)]
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    for name, sp in sub.choices.items():  # type: ignore[union-attr]
        assert any(name in line.replace("|", " ").split() for line in synopsis.splitlines()
                   if line.strip().startswith("kvmagent ")), name
        assert f"**{name}**" in commands or f"**{name} " in commands, name
        for action in sp._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert option in synopsis, (name, option)
