"""The cached Debian 12 root for `root="debian"` test hosts, and an offline apt repository.

Built only by `/usr/bin/python3 -m tests.harness setup` (= `make setup`), never by a
test: a test that finds the cache missing fails and says so.  The cache key hashes
the package lists, the apt sources and this file, so editing any of them makes the
next setup build a fresh tree; the build goes into a temp dir that is renamed into
place, so an interrupted build never looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from .sysutil import CACHE_ROOT, HarnessError, log, mounts_under, proc_alive, run_cmd, safe_rmtree

RELEASE = "bookworm"
ROOTFS_DIR = CACHE_ROOT / "rootfs"
DEBS_DIR = CACHE_ROOT / "debs"
STAMP = "etc/kvmagent-tests-rootfs.json"  # inside the root: tells a test which tree it runs on

# What debootstrap puts in (enough to boot), then what apt adds (what kvmagent and the tests use).
INCLUDE = ("systemd", "systemd-sysv", "dbus", "python3")
EXTRA = (
    "python3-pystemd", "python3-pydbus", "python3-pyroute2", "python3-systemd",
    "iproute2", "procps", "systemd-container", "qemu-system-x86",
)
# kvmagent's runtime Depends (keep in step with debian/control): their closure against the
# bare debootstrap root is kept as an offline repo, because containers have no network.
RUNTIME_DEPS = (
    "python3-pystemd", "python3-pydbus", "python3-pyroute2", "python3-systemd",
    "systemd-container", "qemu-system-x86", "iproute2",
)
SETUP_HINT = "run `make setup` (or: /usr/bin/python3 -m tests.harness setup) as root"


def apt_sources(paths: Sequence[Path] = ()) -> list[tuple[str, str]]:
    """(uri, suite) pairs for RELEASE* from the host's deb822 and one-line apt sources."""
    if not paths:
        paths = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
        paths = [*paths, *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
        paths.append(Path("/etc/apt/sources.list"))
    pairs: list[tuple[str, str]] = []
    for path in paths:
        if not path.is_file():
            continue
        text = path.read_text()
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
                if "deb" not in fields.get("Types", "").split() or fields.get("Enabled") == "no":
                    continue
                for uri in fields.get("URIs", "").split():
                    pairs += [(uri, s) for s in fields.get("Suites", "").split()]
        else:
            for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", text, re.M):
                pairs.append((m[1], m[2]))
    pairs = [(u.rstrip("/"), s) for u, s in pairs if s.split("-")[0] == RELEASE]
    if not any(s == RELEASE for _, s in pairs):
        raise HarnessError(f"no apt source for {RELEASE} in {[str(p) for p in paths]}")
    return list(dict.fromkeys(pairs))


def cache_key(sources: Sequence[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([RELEASE, INCLUDE, EXTRA, RUNTIME_DEPS, list(sources)]).encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def cached_root() -> Path:
    """The built debian root; HarnessError with the setup hint if it is missing or stale."""
    key = cache_key(apt_sources())
    root = ROOTFS_DIR / key
    if not (root / STAMP).is_file():
        raise HarnessError(f"no debian test root at {root} (missing or stale cache): {SETUP_HINT}")
    return root


def cached_debs() -> Path:
    repo = DEBS_DIR / cache_key(apt_sources())
    if not (repo / "Packages").is_file():
        raise HarnessError(f"no offline deb repository at {repo}: {SETUP_HINT}")
    return repo


def _nspawn(root: Path, argv: Sequence[str], binds: Sequence[str] = (), timeout: float = 1800) -> None:
    """Run argv in root (not booted) with the host's network, for apt."""
    machine = f"ktbuild{os.getpid()}"
    try:
        run_cmd(
            ["systemd-nspawn", "--quiet", f"--directory={root}", f"--machine={machine}",
             "--register=no", "--keep-unit", "--setenv=DEBIAN_FRONTEND=noninteractive",
             *binds, "--", *argv],
            timeout=timeout,
        )
    finally:
        # nspawn leaves this empty dir behind on a /run that is not tmpfs (harness.md §1).
        _rmdir_quiet(Path("/run/systemd/nspawn/propagate") / machine)


def _rmdir_quiet(path: Path) -> None:
    try:
        path.rmdir()
    except (FileNotFoundError, OSError):
        pass


def write_repo_index(repo: Path) -> int:
    """Write Packages and Release for a flat repo (`deb [trusted=yes] file:REPO ./`).

    Done in Python with `dpkg-deb --field` (package dpkg) so setup needs neither
    dpkg-dev (dpkg-scanpackages) nor apt-utils (apt-ftparchive)."""
    stanzas = []
    for deb in sorted(repo.glob("*.deb")):
        control = run_cmd(["dpkg-deb", "--field", str(deb)]).stdout.strip("\n")
        data = deb.read_bytes()
        stanzas.append(
            f"{control}\nFilename: ./{deb.name}\nSize: {len(data)}\n"
            f"MD5sum: {hashlib.md5(data).hexdigest()}\nSHA256: {hashlib.sha256(data).hexdigest()}\n"
        )
    packages = "\n".join(stanzas).encode()
    (repo / "Packages").write_bytes(packages)
    # apt refuses a repo without Release unless told to allow insecure repos; [trusted=yes]
    # covers the missing signature, the Release file covers the rest.
    date = time.strftime("%a, %d %b %Y %H:%M:%S UTC", time.gmtime())
    (repo / "Release").write_text(
        f"Origin: kvmagent-tests\nLabel: kvmagent-tests\nSuite: local\nCodename: local\n"
        f"Date: {date}\nArchitectures: amd64 all\n"
        f"SHA256:\n {hashlib.sha256(packages).hexdigest()} {len(packages)} Packages\n"
    )
    return len(stanzas)


def _ours(entry: Path) -> bool:
    """Only trees this module built: the cache root is shared with other test helpers
    (loose kernel .debs live in debs/ too), so never judge an entry by its name alone."""
    if not entry.is_dir() or entry.is_symlink():
        return False
    stamp, release = entry / STAMP, entry / "Release"
    return (stamp.is_file() or (release.is_file()
            and release.read_text(errors="replace").startswith("Origin: kvmagent-tests\n")))


def _remove_stale(parent: Path, keep: str) -> None:
    """Remove our trees of other keys, and temp dirs of builds whose process is gone."""
    for entry in sorted(parent.iterdir()) if parent.is_dir() else []:
        m = re.fullmatch(r"\.(?:build|old)-[0-9a-f]{16}-(\d+)", entry.name)
        if m and entry.is_dir() and not proc_alive(int(m[1]), None):
            log.info("removing %s (its build process is gone)", entry)
            safe_rmtree(entry)
        elif re.fullmatch(r"[0-9a-f]{16}", entry.name) and entry.name != keep and _ours(entry):
            log.info("removing stale %s", entry)
            safe_rmtree(entry)


def build(force: bool = False) -> dict[str, object]:
    """Build (or keep) the debian root and the offline repo; return timings and paths."""
    sources = apt_sources()
    key = cache_key(sources)
    root, repo = ROOTFS_DIR / key, DEBS_DIR / key
    if not force and (root / STAMP).is_file() and (repo / "Packages").is_file():
        info = json.loads((root / STAMP).read_text())
        _remove_stale(ROOTFS_DIR, key)
        _remove_stale(DEBS_DIR, key)
        return {**info, "root": str(root), "debs": str(repo), "rebuilt": False}

    ROOTFS_DIR.mkdir(parents=True, exist_ok=True)
    DEBS_DIR.mkdir(parents=True, exist_ok=True)
    tmp_root = ROOTFS_DIR / f".build-{key}-{os.getpid()}"
    tmp_repo = DEBS_DIR / f".build-{key}-{os.getpid()}"
    mirror = next(u for u, s in sources if s == RELEASE)
    try:
        t0 = time.monotonic()
        run_cmd(
            ["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}",
             RELEASE, str(tmp_root), mirror],
            timeout=3600,
        )
        t_debootstrap = time.monotonic() - t0
        # The same suites as the host (updates, security), so versions match a current Debian 12.
        (tmp_root / "etc/apt/sources.list").write_text(
            "".join(f"deb {u} {s} main\n" for u, s in sources)
        )
        t1 = time.monotonic()
        (tmp_repo / "partial").mkdir(parents=True)
        _nspawn(tmp_root, ["apt-get", "update", "-q"])
        # Download the runtime closure against the *bare* root: that is what a clean host needs.
        _nspawn(
            tmp_root,
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "--download-only",
             "-o", "Dir::Cache::archives=/mnt/debs/", *RUNTIME_DEPS],
            binds=[f"--bind={tmp_repo}:/mnt/debs"],
        )
        (tmp_repo / "partial").rmdir()
        n_debs = write_repo_index(tmp_repo)
        # Seed apt's cache with those debs so the EXTRA install does not fetch them twice.
        archives = tmp_root / "var/cache/apt/archives"  # a plain dir in a fresh debootstrap
        for deb in tmp_repo.glob("*.deb"):
            shutil.copyfile(deb, archives / deb.name)
        _nspawn(tmp_root, ["apt-get", "install", "-y", "-q", "--no-install-recommends", *EXTRA])
        _nspawn(tmp_root, ["apt-get", "clean"])
        t_apt = time.monotonic() - t1
        # An empty machine-id makes every boot generate its own (debootstrap's systemd
        # postinst wrote one, which all test hosts would otherwise share).
        (tmp_root / "etc/machine-id").write_text("")
        # debootstrap copies the build host's /etc/hostname; without it each test host is
        # named after its machine name (nspawn sets the hostname).
        (tmp_root / "etc/hostname").unlink(missing_ok=True)
        info: dict[str, object] = {
            "key": key, "release": RELEASE, "sources": sources, "built": time.time(),
            "debootstrap_seconds": round(t_debootstrap, 1), "apt_seconds": round(t_apt, 1),
            "offline_debs": n_debs,
        }
        (tmp_root / STAMP).write_text(json.dumps(info, indent=1) + "\n")
        # Rename the repo first: a root without its repo is incomplete, the reverse is not used.
        for tmp, final in ((tmp_repo, repo), (tmp_root, root)):
            if final.exists():
                old = final.with_name(f".old-{key}-{os.getpid()}")
                final.rename(old)
                safe_rmtree(old)
            tmp.rename(final)
    finally:
        for tmp in (tmp_root, tmp_repo):
            if tmp.exists():
                if mounts_under(tmp):
                    log.error("not removing %s: mounts left under it", tmp)
                else:
                    safe_rmtree(tmp)
    _remove_stale(ROOTFS_DIR, key)
    _remove_stale(DEBS_DIR, key)
    return {**info, "root": str(root), "debs": str(repo), "rebuilt": True}


def size_mb(path: Path) -> int:
    return int(run_cmd(["du", "-sxm", str(path)]).stdout.split()[0])
