"""Parts of a big library without its package __init__.

pystemd's __init__ imports its introspecting Unit/Manager API and with it
lxml (~30 ms); pyroute2's loads every module it has through entry points
(~90 ms more than its IPRoute).  kvmagent uses pystemd.dbuslib and
pyroute2.iproute.linux, on the path of every guest start and of `kvmagent
list`.  enter(PACKAGE) makes PACKAGE's modules importable without running
its __init__; importing any other module of the package still works, but
not a name that only the __init__ defines (`from pyroute2 import IPRoute`
fails in that process: kvmagent imports from the modules themselves)."""

from __future__ import annotations

import importlib.util
import sys


def enter(package: str) -> None:
    if package in sys.modules:
        return
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations is not None:
        sys.modules[package] = importlib.util.module_from_spec(spec)
