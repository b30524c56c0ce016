"""The product rule: kvmagent/ never runs ip, brctl, tunctl or an ifup script;
networking is netlink via pyroute2, in-process (kvmagent/host/netlink.py, and
on it netdev.py for the taps and bridge.py for the bridges).

Pure source scans: no root, no namespace needed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.net

PACKAGE = Path(__file__).resolve().parents[2] / "kvmagent"
TOOLS = {"ip", "brctl", "tunctl", "ifup", "ifdown", "ifconfig", "vconfig"}


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants that are not docstrings."""
    docstrings = {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings]


def test_package_names_no_network_tool():
    sources = sorted(PACKAGE.glob("**/*.py"))
    assert PACKAGE / "host" / "netdev.py" in sources
    found = []
    for path in sources:
        if path.parent.name == "foreign":  # reads other tools' files, which name them
            continue  # (test_foreign_runs_nothing)
        for line, text in _strings(ast.parse(path.read_text(), str(path))):
            words = text.split()
            argv0 = words[0].rsplit("/", 1)[-1] if words else ""
            # An argv[0] ("ip", "/sbin/ip") or a shell-ish "brctl addif ..." string;
            # and QEMU's own ifup hook (script=/etc/kvm/...; only script=no is fine).
            if (text.strip().rsplit("/", 1)[-1] in TOOLS
                    or (len(words) > 1 and argv0 in TOOLS - {"ip"})
                    or re.match(r"ip( -\S+)* (link|l|addr|address|a|tuntap|route|r|netns)"
                                r" (add|del|delete|set|show|flush|replace|exec)\b", text)
                    or re.search(r"(^|,)(down)?script=(?!no\b)", text)):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {text!r}")
    assert not found, "network tools named in kvmagent/:\n" + "\n".join(found)


NETLINK = ("netlink.py", "netdev.py", "bridge.py")  # the base, the taps, the bridges


def test_netlink_modules_spawn_nothing():
    imports_pyroute2 = []
    for name in NETLINK:
        text = (PACKAGE / "host" / name).read_text()
        for pattern in (r"\bsubprocess\b", r"\bbrctl\b", r"\btunctl\b", r"[\"']ip[\"']",
                        r"\bos\.(system|popen|exec\w*|spawn\w*|posix_spawn\w*)\b",
                        r"\bpty\b", r"shell\s*="):
            assert not re.search(pattern, text), f"{name} matches {pattern}"
        imported = {alias.name.split(".")[0]
                    for node in ast.walk(ast.parse(text))
                    if isinstance(node, (ast.Import, ast.ImportFrom))
                    for alias in (node.names if isinstance(node, ast.Import) else
                                  [ast.alias(node.module or "")])}
        assert not imported & {"subprocess", "shlex", "pty", "sh"}, name
        if "pyroute2" in imported:
            imports_pyroute2.append(name)
    # one module imports pyroute2 (lean: kvmagent.host.leanimport); the others use it
    assert imports_pyroute2 == ["netlink.py"]


def test_foreign_runs_nothing():
    """kvmagent/foreign reads scripts and configurations that name brctl, ip
    and ifup scripts (that is what it translates); it runs none of them, or
    anything else."""
    sources = sorted((PACKAGE / "foreign").glob("*.py"))
    assert PACKAGE / "foreign" / "kvmscript.py" in sources
    for path in sources:
        text = path.read_text()
        tree = ast.parse(text)
        imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, (ast.Import, ast.ImportFrom))
                    for alias in (node.names if isinstance(node, ast.Import) else
                                  [ast.alias(node.module or "")])}
        assert not imported & {"subprocess", "shlex", "pty", "sh", "pexpect"}, path
        assert not re.search(r"\bos\.(system|popen|exec\w*|spawn\w*|posix_spawn\w*)\b|"
                             r"\b(eval|exec)\(", text), path


@pytest.mark.parametrize("text, bad", [
    ("ip", True), ("/sbin/ip", True), ("brctl addif br-kvm", True),
    ("ip link set dev tap0 up", True), ("ip -6 addr add fd00::1/64", True), ("tap,id=n0,script=/etc/kvm/ifup", True),
    ("tap,id=n0,script=no,downscript=no", False), ("tap,id=n0,fd=3", False),
    ("ipv6", False), ("ip address of the bridge is missing", False),
])
def test_scan_rule(text, bad, tmp_path, monkeypatch):
    (tmp_path / "host").mkdir()
    (tmp_path / "host" / "netdev.py").write_text("")
    (tmp_path / "mod.py").write_text(f'"""docstring: brctl addif"""\nX = {text!r}\n')
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path)
    if bad:
        with pytest.raises(AssertionError):
            test_package_names_no_network_tool()
    else:
        test_package_names_no_network_tool()
