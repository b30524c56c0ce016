"""The Pacemaker cluster stack for the test hosts (#21): an offline apt
repository of its packages, beside the release's own (tests/harness/rootfs.py),
installed into a test host at test time rather than into the cached root, so
that the other tests' hosts stay as they are and only the cluster tests pay.

The closure is downloaded against the release's cached test root (what a test
host boots), on a throwaway overlay of it with the network: built by `make
setup` (or `python3 -m tests.harness setup-cluster`), never by a test.  Keyed
by the package list, the root's own key and this code."""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from pathlib import Path

from . import rootfs
from .sysutil import (CACHE_ROOT, HarnessError, nspawn_run, put_in_place, remove_unfinished,
                      safe_rmtree)

# corosync and pacemaker (the cluster), crmsh (its command line: Python, no ruby
# nor pcsd, unlike pcs), resource-agents (ocf-tester, and Debian's agents) with
# libxml2-utils (its Recommends: ocf-tester checks meta-data with xmllint).
PACKAGES = ("pacemaker", "corosync", "crmsh", "resource-agents", "libxml2-utils")
RELEASES = ("bookworm",)  # Debian 12 is enough for these tests (#21)
DIR = CACHE_ROOT / "cluster-debs"  # DIR/RELEASE/KEY
HINT = ("run `make setup` (or: /usr/bin/python3 -m tests.harness setup-cluster) as root, "
        "with the network")


def key(release: str) -> str:
    release = rootfs.resolve(release)
    h = hashlib.sha256()
    h.update(json.dumps([release, PACKAGES,
                         rootfs.cache_key(release, rootfs.apt_sources(release))]).encode())
    h.update(inspect.getsource(build).encode())
    return h.hexdigest()[:16]


def cached(release: str) -> Path:
    """The release's cluster repository; HarnessError saying how to make it."""
    release = rootfs.resolve(release)
    repo = DIR / release / key(release)
    if not (repo / "Packages").is_file():
        raise HarnessError(f"no offline repository of the cluster stack for {release} at "
                           f"{repo}: {HINT}")
    rootfs.mark_used(repo)
    return repo


def build(release: str, force: bool = False) -> dict[str, object]:
    release = rootfs.resolve(release)
    root = rootfs.cached_root(release)
    k = key(release)
    repo = DIR / release / k
    if not force and (repo / "Packages").is_file():
        return {"cluster_debs": str(repo), "rebuilt": False}
    repo.parent.mkdir(parents=True, exist_ok=True)
    tmp = repo.parent / f".build-{k}"
    safe_rmtree(tmp)
    t0 = time.monotonic()
    try:
        (tmp / "partial").mkdir(parents=True)
        nspawn_run(root, ["sh", "-c", 'apt-get update -q && exec "$@"', "sh",
                          "apt-get", "install", "-y", "-q", "--no-install-recommends",
                          "--download-only", "-o", "Dir::Cache::archives=/mnt/debs/",
                          *PACKAGES],
                   binds=[f"--bind={tmp}:/mnt/debs"], volatile=True)
        (tmp / "partial").rmdir()
        n = rootfs.write_repo_index(tmp)
        put_in_place(tmp, repo, k)
    finally:
        remove_unfinished(tmp)
    return {"cluster_debs": str(repo), "rebuilt": True, "debs": n,
            "mb": rootfs.size_mb(repo), "seconds": round(time.monotonic() - t0, 1)}
