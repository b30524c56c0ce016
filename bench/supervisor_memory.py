#!/usr/bin/python3
"""Where one supervisor's memory goes (#22): the interpreter alone, and the
Python heap that each module the supervisor keeps loaded costs, measured in
fresh interpreters of this machine (or of a test host: bench/scale_inner.py
runs it there), with kvmagent's modules as `kvmagent run NAME` imports them
(kvmagent.cli.main, kvmagent.unit.run, kvmagent.unit.supervisor).

- bare: `python3` that has imported nothing of its own (site only):
  smaps_rollup's PSS and USS.
- imported: the same after kvmagent's supervisor modules.
- per module: tracemalloc's traced memory before and after importing each
  module, in the order -X importtime says they finish (leaves first), so
  each module's own cost is counted once, its imports' before it.
- without bytecode: the imported figures for a copy of the tree without
  __pycache__ (nothing written): what a supervisor costs if the package's
  .pyc files are missing (the package ships them compiled: dh_python3).

A running supervisor holds more than its modules: its objects, the console
log's buffers, the journal's backlog; bench/scale_inner.py measures those.

Run:  /usr/bin/python3 bench/supervisor_memory.py [--tree DIR] [--json]"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import smaps  # noqa: E402

ENTRY = ("kvmagent.cli.main", "kvmagent.unit.run", "kvmagent.unit.supervisor")
PYTHON = "/usr/bin/python3"

# Run in a fresh interpreter: TREE MODE.  Prints JSON.
PROBE = r'''
import json, os, sys
tree, mode, entry = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
sys.path.insert(0, tree)
def rollup():
    with open(f"/proc/{os.getpid()}/smaps_rollup") as f:
        return f.read()
out = {"bare": rollup()}
if mode == "modules":
    import importlib, tracemalloc
    order = sys.argv[4].split(",")
    tracemalloc.start()
    cost = {}
    for name in order:
        if name in sys.modules:
            continue
        before = tracemalloc.get_traced_memory()[0]
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        cost[name] = tracemalloc.get_traced_memory()[0] - before
    out["cost"] = cost
else:
    for name in entry:
        __import__(name)
    out["imported"] = rollup()
    with open(f"/proc/{os.getpid()}/smaps") as f:
        out["smaps"] = f.read()
    out["modules"] = len(sys.modules)
print(json.dumps(out))
'''
_IMPORTTIME = re.compile(r"^import time:\s+\d+ \|\s+\d+ \| ( *)(\S+)$")


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120,
                          env=env if env is not None else os.environ.copy())


def import_order(tree: Path) -> list[str]:
    """The modules the supervisor's entry imports, in the order they finish."""
    code = f"import sys; sys.path.insert(0, {str(tree)!r}); " + "; ".join(
        f"import {m}" for m in ENTRY)
    err = _run([PYTHON, "-X", "importtime", "-c", code]).stderr
    return [m.group(2) for line in err.splitlines() if (m := _IMPORTTIME.match(line))]


def probe(tree: Path, mode: str, *extra: str, env: dict[str, str] | None = None
          ) -> dict[str, object]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(PROBE)
    try:
        out = _run([PYTHON, f.name, str(tree), mode, ",".join(ENTRY), *extra], env=env).stdout
    finally:
        os.unlink(f.name)
    return dict(json.loads(out))


def group(cost: dict[str, int]) -> list[tuple[str, int]]:
    """kvmagent's modules one by one, the standard library by its top-level
    package; largest first (bytes)."""
    groups: dict[str, int] = {}
    for name, size in cost.items():
        key = name if name.startswith("kvmagent") else name.split(".")[0]
        groups[key] = groups.get(key, 0) + size
    return sorted(groups.items(), key=lambda kv: -kv[1])


def measure(tree: Path) -> dict[str, object]:
    order = import_order(tree)
    cost = probe(tree, "modules", ",".join(order))["cost"]
    full = probe(tree, "imported")
    bare, imported = smaps.rollup(str(full["bare"])), smaps.rollup(str(full["imported"]))
    with tempfile.TemporaryDirectory() as tmp:  # the same tree, no bytecode of it
        copy = Path(tmp) / "tree"
        shutil.copytree(tree / "kvmagent", copy / "kvmagent",
                        ignore=shutil.ignore_patterns("__pycache__"))
        env = os.environ.copy()
        env.pop("PYTHONPYCACHEPREFIX", None)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        nopyc = smaps.rollup(str(probe(copy, "imported", env=env)["imported"]))
    assert isinstance(cost, dict)
    return {"bare": {"pss": bare["Pss"], "uss": smaps.uss(bare)},
            "imported": {"pss": imported["Pss"], "uss": smaps.uss(imported)},
            "no pyc": {"pss": nopyc["Pss"], "uss": smaps.uss(nopyc)},
            "categories": smaps.by_category(smaps.mappings(str(full["smaps"]))),
            "modules": full["modules"], "python": sys.version.split()[0],
            "groups": group({str(k): int(v) for k, v in cost.items()})}


def report(r: dict[str, object], top: int = 14) -> str:
    b, i, n = (r[k] for k in ("bare", "imported", "no pyc"))
    assert isinstance(b, dict) and isinstance(i, dict) and isinstance(n, dict)
    groups = r["groups"]
    assert isinstance(groups, list)
    total = sum(size for _, size in groups)
    lines = [f"one supervisor's interpreter (Python {r['python']}, {r['modules']} modules "
             "loaded), KiB:",
             f"  python3 alone (site only)       PSS {b['pss']:>6}  USS {b['uss']:>6}",
             f"  + the supervisor's modules      PSS {i['pss']:>6}  USS {i['uss']:>6}"
             f"  (+{i['uss'] - b['uss']} private)",
             f"  the same without .pyc files     PSS {n['pss']:>6}  USS {n['uss']:>6}"
             f"  (+{n['uss'] - i['uss']} for compiling the sources)",
             f"Python heap of each module once imported (tracemalloc), {total // 1024} KiB in all:"]
    for name, size in groups[:top]:
        lines.append(f"  {name:<32} {size / 1024:>7.0f}")
    if len(groups) > top:
        rest = sum(size for _, size in groups[top:])
        lines.append(f"  {f'{len(groups) - top} more':<32} {rest / 1024:>7.0f}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1],
                   help="the checkout (or installed tree) holding kvmagent/")
    p.add_argument("--json", action="store_true", help="print JSON, not the table")
    args = p.parse_args()
    r = measure(args.tree)
    print(json.dumps(r) if args.json else report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
