"""completion/kvmagent.bash in step with the command line: every
command a user types (not the internal ones that kvmagent runs itself) is
offered, and so is each of its long options, by bash itself."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmagent.cli.parser import build_parser

COMPLETION = Path(__file__).resolve().parents[2] / "completion" / "kvmagent.bash"


def commands() -> dict[str, list[str]]:
    """Each public command and its long options (--help aside)."""
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {c.dest: c.help or "" for c in sub._choices_actions}
    return {name: sorted(o for a in sp._actions for o in a.option_strings
                         if o.startswith("--") and o != "--help")
            for name, sp in sub.choices.items() if not helps[name].startswith("internal")}


def complete(*words: str) -> list[str]:
    """What bash offers after `kvmagent WORDS...` (the last word being completed)."""
    if shutil.which("bash") is None:
        pytest.fail("bash is needed to test its completion")
    script = (f"source {COMPLETION}; COMP_WORDS=(kvmagent {' '.join(words)}); "
              f"COMP_CWORD={len(words)}; KVMAGENT_CONFIG_DIR=/nonexistent; _kvmagent; "
              'printf "%s\\n" "${COMPREPLY[@]}"')
    r = subprocess.run(["bash", "--norc", "-c", script], capture_output=True, text=True,
                       check=True)
    return r.stdout.split()


def test_every_public_command_is_offered() -> None:
    offered = complete("")
    public = commands()
    assert "migrate" in public and "migrate-incoming" not in public  # the rule holds
    missing = sorted(set(public) - set(offered))
    assert not missing, f"the completion does not offer: {missing}"
    internal = sorted(set(offered) - set(public) - {"--help", "--version", "--config-dir", "-H"})
    assert not internal, f"the completion offers what is no public command: {internal}"


@pytest.mark.parametrize("command", sorted(commands()))
def test_every_option_is_offered(command: str) -> None:
    wanted = commands()[command]
    first = {"bridge": ["ensure"], "import": ["xen", "f"]}.get(command, [])
    offered = complete(command, *first, "--")
    assert sorted(set(wanted) - set(offered)) == [], (command, offered)


def test_migrate_offers_a_guest_then_a_host() -> None:
    # no guest files here (KVMAGENT_CONFIG_DIR): nothing but options
    assert complete("migrate", "") == []
    assert "--copy-config" in complete("migrate", "g", "h", "")
