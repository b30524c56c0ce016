"""The cached Debian roots of the test hosts, one per release, each with an
offline apt repository of kvmagent's runtime dependencies.

A test host boots the root of a release (`root="bookworm"` or `root="trixie"`;
`"debian"` is the release of this machine).  Built only by `/usr/bin/python3 -m
tests.harness setup` (= `make setup`), never by a test: a test that finds the
cache missing fails and says so.  The cache key hashes the package lists, the
apt sources and the code that builds the tree, so changing any of them makes
the next setup build a fresh tree; the build goes into a temp dir that is
renamed into place, so an interrupted build never looks complete.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from .sysutil import (CACHE_ROOT, HarnessError, forget_build_host, log, nspawn_run, proc_alive,
                      procs_mentioning, put_in_place, remove_unfinished, run_cmd, safe_rmtree)

# The releases kvmagent supports: Debian 12 (oldstable) and Debian 13 (stable).
RELEASES = {"bookworm": "12", "trixie": "13"}
ROOTFS_DIR = CACHE_ROOT / "rootfs"  # ROOTFS_DIR/RELEASE/KEY
DEBS_DIR = CACHE_ROOT / "debs"  # DEBS_DIR/RELEASE/KEY
STAMP = "etc/kvmagent-tests-rootfs.json"  # inside the root: tells a test which tree it runs on
# A tree of another key is kept while it may still be in use: another checkout (an older
# branch, CI's clone) runs its tests on the tree of its own key, side by side with this one.
KEEP_SECONDS = 2 * 86400

# What debootstrap puts in (enough to boot), then what apt adds (what kvmagent and the tests use).
INCLUDE = ("systemd", "systemd-sysv", "dbus", "python3")
EXTRA = (
    "python3-pystemd", "python3-pydbus", "python3-pyroute2", "python3-systemd",
    "iproute2", "procps", "systemd-container", "qemu-system-x86",
    # the unit tests, run inside a test host: its Python and libraries, systemd as PID 1
    "python3-pytest", "python3-hypothesis",
    # `kvmagent -H`: two test hosts reach each other over ssh (tests/harness/hostpair.py)
    "openssh-server",
)
# kvmagent's runtime Depends and Recommends (keep in step with debian/control): their
# closure against the bare debootstrap root is kept as an offline repo, because containers
# have no network.
RUNTIME_DEPS = (
    "python3-pystemd", "python3-pydbus", "python3-pyroute2", "python3-systemd",
    "systemd-container", "qemu-system-x86", "qemu-utils", "iproute2",
)
SETUP_HINT = "run `make setup` (or: /usr/bin/python3 -m tests.harness setup) as root"


def host_release(os_release: Path = Path("/etc/os-release")) -> str:
    """This machine's release (its VERSION_CODENAME); HarnessError if not one of RELEASES."""
    fields = dict(re.findall(r'^([A-Z_]+)="?([^"\n]*)"?$', os_release.read_text(), re.M))
    release = fields.get("VERSION_CODENAME", "")
    if release not in RELEASES:
        raise HarnessError(f"this machine runs {fields.get('PRETTY_NAME', release)!r}; "
                           f"the test hosts are built from Debian {' or '.join(RELEASES)}")
    return release


def resolve(release: str) -> str:
    """A release's codename from a codename, Debian's version number or "debian" (this machine's)."""
    if release == "debian":
        return host_release()
    by_version = {v: name for name, v in RELEASES.items()}
    if release in by_version:
        return by_version[release]
    if release not in RELEASES:
        raise HarnessError(f"unknown release {release!r}: one of {', '.join(RELEASES)}")
    return release


def apt_sources(release: str, paths: Sequence[Path] = ()) -> list[tuple[str, str]]:
    """(uri, suite) pairs for RELEASE (main, -updates, -security): the host's deb822
    and one-line sources of its own release, with that release's name put in."""
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
    # The mirrors that serve this machine's release serve the others too.
    own = {s.split("-")[0] for _, s in pairs} & set(RELEASES)
    mapped = [(u.rstrip("/"), release + s[len(s.split("-")[0]):]) for u, s in pairs
              if s.split("-")[0] in own]
    if not any(s == release for _, s in mapped):
        raise HarnessError(f"no apt source for Debian {' or '.join(RELEASES)} in "
                           f"{[str(p) for p in paths]}")
    return list(dict.fromkeys(mapped))


def cache_key(release: str, sources: Sequence[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([release, INCLUDE, EXTRA, RUNTIME_DEPS, list(sources)]).encode())
    # what makes the root, not the rest of this file
    h.update((inspect.getsource(debootstrap) + inspect.getsource(build)).encode())
    return h.hexdigest()[:16]


def cached_root(release: str = "debian") -> Path:
    """The built root of a release; HarnessError with the setup hint if it is missing or stale."""
    release = resolve(release)
    root = ROOTFS_DIR / release / cache_key(release, apt_sources(release))
    if not (root / STAMP).is_file():
        raise HarnessError(f"no Debian {RELEASES[release]} ({release}) test root at {root} "
                           f"(missing or stale cache): {SETUP_HINT}")
    mark_used(root)
    return root


def cached_debs(release: str = "debian") -> Path:
    release = resolve(release)
    repo = DEBS_DIR / release / cache_key(release, apt_sources(release))
    if not (repo / "Packages").is_file():
        raise HarnessError(f"no offline deb repository for {release} at {repo}: {SETUP_HINT}")
    mark_used(repo)
    return repo


def mark_used(tree: Path) -> None:
    """Say that a test uses tree now (PARENT/.used-KEY, beside it: the tree itself
    may be an overlay's lower layer, never written while mounted)."""
    try:
        (tree.parent / f".used-{tree.name}").touch()
    except OSError as e:  # a cache the user may read but not write: nothing to keep
        log.debug("cannot mark %s used: %s", tree, e)


def last_used(tree: Path, stamp: str = STAMP) -> float:
    """When tree was last built or used, as far as can be told: its .used- mark
    (written by this code's tests), its stamp (built), and the access time of a
    file every boot reads (older checkouts write no mark; with relatime the
    access time lags the last use by at most a day, hence KEEP_SECONDS)."""
    times = [0.0]
    for path, field in ((tree.parent / f".used-{tree.name}", "st_mtime"),
                        (tree / stamp, "st_mtime"), (tree / "etc/os-release", "st_atime"),
                        (tree / "Packages", "st_atime"), (tree / "Packages", "st_mtime")):
        try:
            times.append(getattr(path.stat(), field))
        except OSError:
            continue
    return max(times)


def in_use(tree: Path, stamp: str = STAMP) -> list[str]:
    """Why tree must not be removed now: processes naming it (a test host's nspawn
    and its overlay helper name the lower tree), or a recent use."""
    why = [f"process {pid}" for pid, _ in procs_mentioning(str(tree))]
    age = time.time() - last_used(tree, stamp)
    if age < KEEP_SECONDS:
        why.append(f"used {age / 3600:.1f} h ago")
    return why


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


def _ours(entry: Path, stamp: str = STAMP) -> bool:
    """Only trees this package built: the cache root is shared with other test helpers
    (loose kernel .debs live in debs/ too), so never judge an entry by its name alone."""
    if not entry.is_dir() or entry.is_symlink():
        return False
    release = entry / "Release"
    return ((entry / stamp).is_file() or (release.is_file()
            and release.read_text(errors="replace").startswith("Origin: kvmagent-tests\n")))


def _remove_stale(parent: Path, keep: str, stamp: str = STAMP) -> None:
    """Remove our trees of other keys (those with STAMP, or offline repos) that no
    test has used for KEEP_SECONDS (in_use), and temp dirs of builds whose
    process is gone.  buildroot.py's trees too."""
    for entry in sorted(parent.iterdir()) if parent.is_dir() else []:
        m = re.fullmatch(r"\.(?:build|old)-[0-9a-f]{16}-(\d+)", entry.name)
        if m and entry.is_dir() and not proc_alive(int(m[1]), None):
            log.info("removing %s (its build process is gone)", entry)
            safe_rmtree(entry)
        elif (re.fullmatch(r"[0-9a-f]{16}", entry.name) and entry.name != keep
              and _ours(entry, stamp)):
            if why := in_use(entry, stamp):
                log.info("keeping %s of another key: %s", entry, ", ".join(why))
                continue
            log.info("removing stale %s", entry)
            safe_rmtree(entry)
            (parent / f".used-{entry.name}").unlink(missing_ok=True)
        elif (m := re.fullmatch(r"\.used-([0-9a-f]{16})", entry.name)) and not (
                parent / m[1]).exists():
            entry.unlink(missing_ok=True)


def debootstrap(release: str, target: Path, sources: Sequence[tuple[str, str]],
                variant: str, include: Sequence[str] = ()) -> None:
    """A fresh root of release at target, its apt sources set (main, -updates, -security)."""
    mirror = next(u for u, s in sources if s == release)
    run_cmd(["debootstrap", f"--variant={variant}",
             *([f"--include={','.join(include)}"] if include else []),
             release, str(target), mirror], timeout=3600)
    # The suites of a current Debian (updates, security), not just the release as it came out.
    (target / "etc/apt/sources.list").write_text("".join(f"deb {u} {s} main\n" for u, s in sources))


def build(release: str = "debian", force: bool = False) -> dict[str, object]:
    """Build (or keep) a release's root and offline repo; return timings and paths."""
    release = resolve(release)
    sources = apt_sources(release)
    key = cache_key(release, sources)
    root_dir, debs_dir = ROOTFS_DIR / release, DEBS_DIR / release
    root, repo = root_dir / key, debs_dir / key
    _remove_old_layout()
    if not force and (root / STAMP).is_file() and (repo / "Packages").is_file():
        info = json.loads((root / STAMP).read_text())
        _remove_stale(root_dir, key)
        _remove_stale(debs_dir, key)
        return {**info, "root": str(root), "debs": str(repo), "rebuilt": False}

    root_dir.mkdir(parents=True, exist_ok=True)
    debs_dir.mkdir(parents=True, exist_ok=True)
    tmp_root = root_dir / f".build-{key}-{os.getpid()}"
    tmp_repo = debs_dir / f".build-{key}-{os.getpid()}"
    try:
        t0 = time.monotonic()
        debootstrap(release, tmp_root, sources, "minbase", INCLUDE)
        t_debootstrap = time.monotonic() - t0
        t1 = time.monotonic()
        (tmp_repo / "partial").mkdir(parents=True)
        nspawn_run(tmp_root, ["apt-get", "update", "-q"])
        # Download the runtime closure against the *bare* root: that is what a clean host needs.
        nspawn_run(
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
        nspawn_run(tmp_root, ["apt-get", "install", "-y", "-q", "--no-install-recommends", *EXTRA])
        nspawn_run(tmp_root, ["apt-get", "clean"])
        t_apt = time.monotonic() - t1
        forget_build_host(tmp_root)
        info: dict[str, object] = {
            "key": key, "release": release, "sources": sources, "built": time.time(),
            "debootstrap_seconds": round(t_debootstrap, 1), "apt_seconds": round(t_apt, 1),
            "offline_debs": n_debs,
        }
        (tmp_root / STAMP).write_text(json.dumps(info, indent=1) + "\n")
        # Rename the repo first: a root without its repo is incomplete, the reverse is not used.
        put_in_place(tmp_repo, repo, key)
        put_in_place(tmp_root, root, key)
    finally:
        remove_unfinished(tmp_root)
        remove_unfinished(tmp_repo)
    _remove_stale(root_dir, key)
    _remove_stale(debs_dir, key)
    return {**info, "root": str(root), "debs": str(repo), "rebuilt": True}


def _remove_old_layout() -> None:
    """Trees of the time when there was one release (ROOTFS_DIR/KEY, DEBS_DIR/KEY)."""
    for parent in (ROOTFS_DIR, DEBS_DIR):
        _remove_stale(parent, keep="")


def size_mb(path: Path) -> int:
    return int(run_cmd(["du", "-sxm", str(path)]).stdout.split()[0])
