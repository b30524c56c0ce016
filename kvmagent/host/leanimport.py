"""Parts of a big library without its package __init__.

pystemd's __init__ imports its introspecting Unit/Manager API and with it
lxml (~30 ms); pyroute2's loads every module it has through entry points
(~90 ms more than its IPRoute).  kvmagent uses pystemd.dbuslib and
pyroute2.iproute.linux, on the path of every guest start and of `kvmagent
list`.  enter(PACKAGE) makes PACKAGE's modules importable without running
its __init__; importing any other module of the package still works, but
not a name that only the __init__ defines (`from pyroute2 import IPRoute`
fails in that process: kvmagent imports from the modules themselves).

import_without(MODULE, DEPENDENCY, NAME) imports a module that takes a name
from a dependency it needs only on a rare path: pystemd.dbuslib's `from
pprint import pformat` (for one error message) costs ~10 ms, as pprint
brings dataclasses and inspect (measured on Debian 12: importing
kvmagent.host.systemd takes 31 ms and 12.4 MiB with the stand-in, 42 ms and
13.8 MiB without; tests/libs fails when pystemd stops taking pformat).
And gi of Debian 13 (PyGObject 3.50) imports asyncio as it loads, for its
asyncio integration (awaitable Gio calls, an asyncio event loop on GLib's),
which pydbus's blocking calls never use: asyncio with ssl, logging,
inspect and concurrent.futures is ~95 ms of the ~275 ms that
kvmagent.host.machined took to import there (measured under load:
`python3 -X importtime`), in the child that registers every guest with
machined while QEMU starts (kvmagent.host.machined; tests/libs checks that
asyncio stays out, on Debian 12's gi and 13's).

Both reach past a library's public face, so another version of it may lack
what kvmagent takes: missing() turns that ImportError into a host error that
names the library, its version and what is missing (tests/libs run against
Debian 12's and 13's versions)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

from kvmagent.errors import KvmagentError, host_error


def enter(package: str) -> None:
    if package in sys.modules:
        return
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations is not None:
        sys.modules[package] = importlib.util.module_from_spec(spec)


def import_without(module: str, dependency: str, name: str, **fixed: Any) -> None:
    """Import MODULE while DEPENDENCY (if nobody imported it yet) is a
    stand-in whose NAME imports the real DEPENDENCY when first called.  The
    stand-in leaves sys.modules when MODULE's import returns, so a later
    import of DEPENDENCY gets the real one; any other name asked of it (by a
    module imported meanwhile that took it for the real one) imports the
    real one at once, but those of FIXED: values the stand-in holds as they
    are, for a name that MODULE takes as it loads and keeps for a path
    kvmagent never takes (a class cannot be had lazily)."""
    if module in sys.modules or dependency in sys.modules:
        importlib.import_module(module)
        return
    stand_in = types.ModuleType(dependency, f"kvmagent's stand-in for {dependency}")

    def real() -> types.ModuleType:
        if sys.modules.get(dependency) is stand_in:
            del sys.modules[dependency]
        return importlib.import_module(dependency)

    def late(*args: Any, **kwargs: Any) -> Any:
        return getattr(real(), name)(*args, **kwargs)

    def other(attr: str) -> Any:  # the module's __getattr__ (PEP 562)
        if attr.startswith("__"):  # the import system's questions (__path__...)
            raise AttributeError(attr)
        return getattr(real(), attr)

    setattr(stand_in, name, late)
    for attr, value in fixed.items():
        setattr(stand_in, attr, value)
    setattr(stand_in, "__getattr__", other)
    sys.modules[dependency] = stand_in
    try:
        importlib.import_module(module)
    finally:
        if sys.modules.get(dependency) is stand_in:
            del sys.modules[dependency]


def missing(package: str, exc: ImportError) -> KvmagentError:
    """A host error (exit 5) for an installed PACKAGE that lacks a module or
    name kvmagent imports from it."""
    try:
        import importlib.metadata  # only on this path: ~10 ms
        version = importlib.metadata.version(package)
    except Exception:  # not installed as a distribution at all
        version = "(version unknown)"
    return host_error(f"the installed {package} {version} lacks what kvmagent uses: {exc}",
                      f"kvmagent works with the {package} of Debian 12 and 13: install "
                      f"python3-{package} from this release")
