"""Clean build roots: the package built as Debian's own builders build it.

sbuild and pbuilder build a package in a minimal root of its release with
nothing but build-essential and the package's Build-Depends, as a user who
is not root, without network.  A build root here is the same: a debootstrap
`buildd` root of the release with `apt-get build-dep` of debian/control
(the build-time tests' packages included, as no build profile is set), plus
lintian's .debs, downloaded but not installed, so that lintian can be put in
after the build.  Built by `make setup`, cached under CACHE_ROOT keyed by the
release, its apt sources, the Build-Depends and this file; every build runs
on a throwaway overlay of it (`systemd-nspawn --volatile=overlay`), so the
cached root never changes.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from . import rootfs
from .sysutil import (CACHE_ROOT, HarnessError, forget_build_host, nspawn_run,
                      put_in_place, remove_unfinished, safe_rmtree)

BUILDROOT_DIR = CACHE_ROOT / "buildroot"  # BUILDROOT_DIR/RELEASE/KEY
REPO = Path(__file__).resolve().parents[2]
STAMP = "etc/kvmagent-tests-buildroot.json"
LINTIAN_DEBS = "var/cache/kvmagent-lintian"  # lintian and its closure, not installed
BUILDER = "builder"  # the unprivileged user that builds, as sbuild's
BUILD_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# Tags that fail a build's check (lintian --fail-on); info and pedantic tags are shown.
LINTIAN_FAIL_ON = "error,warning"


def build_depends(control: Path = REPO / "debian" / "control") -> str:
    """The source stanza's Build-Depends* fields, as written (they key the cache)."""
    source = control.read_text().split("\n\n", 1)[0]
    fields = re.findall(r"^(Build-Depends(?:-Indep|-Arch)?):(.*(?:\n[ \t].*)*)", source, re.M)
    return "\n".join(f"{k}:{v}" for k, v in fields)


def cache_key(release: str, sources: list[tuple[str, str]]) -> str:
    """What makes the root: a change to how a package is built in it (BUILD_SCRIPT)
    does not build the root again."""
    h = hashlib.sha256()
    h.update(json.dumps([release, sources, build_depends(), LINTIAN_DEBS, BUILDER]).encode())
    h.update(inspect.getsource(build).encode())
    return h.hexdigest()[:16]


def cached(release: str) -> Path:
    release = rootfs.resolve(release)
    root = BUILDROOT_DIR / release / cache_key(release, rootfs.apt_sources(release))
    if not (root / STAMP).is_file():
        raise HarnessError(f"no clean build root of {release} at {root} (missing, or "
                           f"debian/control changed): {rootfs.SETUP_HINT}")
    rootfs.mark_used(root)
    return root


def build(release: str, force: bool = False) -> dict[str, object]:
    """Build (or keep) the clean build root of release; return timings and its path."""
    release = rootfs.resolve(release)
    sources = rootfs.apt_sources(release)
    key = cache_key(release, sources)
    parent = BUILDROOT_DIR / release
    root = parent / key
    if not force and (root / STAMP).is_file():
        _remove_stale(parent, key)
        return {**json.loads((root / STAMP).read_text()), "root": str(root), "rebuilt": False}
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".build-{key}-{os.getpid()}"
    control = Path(tempfile.mkdtemp(prefix="kvmagent-control-"))
    try:
        t0 = time.monotonic()
        rootfs.debootstrap(release, tmp, sources, "buildd")
        t_debootstrap = time.monotonic() - t0
        (control / "debian").mkdir()
        shutil.copy(REPO / "debian" / "control", control / "debian" / "control")
        nspawn_run(tmp, ["apt-get", "update", "-q"], network=True)
        nspawn_run(tmp, ["apt-get", "build-dep", "-y", "-q", "--no-install-recommends", "/mnt/src"],
                binds=[f"--bind-ro={control}:/mnt/src"], network=True)
        (tmp / LINTIAN_DEBS / "partial").mkdir(parents=True)
        nspawn_run(tmp, ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                      "--download-only", "-o", f"Dir::Cache::archives=/{LINTIAN_DEBS}/",
                      "lintian"], network=True)
        (tmp / LINTIAN_DEBS / "partial").rmdir()
        nspawn_run(tmp, ["apt-get", "clean"], network=True)
        nspawn_run(tmp, ["useradd", "--system", "--no-create-home", "--home-dir",
                      "/nonexistent", BUILDER], network=False)
        forget_build_host(tmp)
        info: dict[str, object] = {
            "key": key, "release": release, "sources": sources, "built": time.time(),
            "build_depends": build_depends(), "debootstrap_seconds": round(t_debootstrap, 1),
            "apt_seconds": round(time.monotonic() - t0 - t_debootstrap, 1),
        }
        (tmp / STAMP).write_text(json.dumps(info, indent=1) + "\n")
        put_in_place(tmp, root, key)
    finally:
        shutil.rmtree(control, ignore_errors=True)
        remove_unfinished(tmp)
    _remove_stale(parent, key)
    return {**info, "root": str(root), "rebuilt": True}


def _remove_stale(parent: Path, keep: str) -> None:
    """Build roots of other keys, and what builds that were killed left."""
    rootfs._remove_stale(parent, keep, STAMP)


# What runs inside the overlay: the build as the unprivileged builder with a
# clean environment (HOME that does not exist, as sbuild's), then lintian
# installed from the root's own .debs and run on the result.
BUILD_SCRIPT = """set -eu
chown -R {builder}: /build
runuser -u {builder} -- env -i PATH={path} HOME=/nonexistent LANG=C.UTF-8 \\
    DEB_BUILD_OPTIONS="{options}" sh -c 'cd /build/src && dpkg-buildpackage -us -uc -b' \\
    >/build/build.log 2>&1 || {{ tail -n 80 /build/build.log; exit 1; }}
echo "build-time tests: $(grep -E '^=+ .*(passed|failed|skipped|no tests ran)' /build/build.log \
    | tr -d = || echo none)"
echo "build-time types: $(grep -E '^Success: no issues found' /build/build.log || echo none)"
if [ {lint} = yes ]; then
    apt-get install -y -q --no-install-recommends --no-download \
        -o Dir::Cache::archives=/{debs}/ lintian >/dev/null 2>&1
    runuser -u {builder} -- lintian --pedantic -I --color never --fail-on {fail_on} \
        /build/*.changes
fi
chown -R 0:0 /build
"""


def build_package(release: str, src: Path, out: Path, *, check: bool = True,
                  lint: bool = True) -> tuple[Path, str]:
    """Build the source tree at src (a copy is built) in release's clean build root.

    check: run the build-time tests (dh_auto_test), as Debian's builders do;
    lint: lintian --pedantic of that release on the result, failing on errors
    and warnings.  The .deb, .changes and .buildinfo go into out; returns the
    .deb, and a report: the build-time tests' summary line, then lintian's output."""
    root = cached(release)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".build-{release}-", dir=out))
    try:
        shutil.copytree(src, work / "src", symlinks=True)
        script = BUILD_SCRIPT.format(builder=BUILDER, path=BUILD_PATH, lint="yes" if lint else "no",
                                     options="" if check else "nocheck", debs=LINTIAN_DEBS,
                                     fail_on=LINTIAN_FAIL_ON)
        try:
            done = nspawn_run(root, ["sh", "-c", script], binds=[f"--bind={work}:/build"],
                           network=False, volatile=True, timeout=1800)
        except HarnessError as e:
            raise HarnessError(f"building {src} in the clean {release} root failed: {e}") from None
        (deb,) = work.glob("kvmagent_*_all.deb")
        for built in (deb, *work.glob("kvmagent_*.changes"), *work.glob("kvmagent_*.buildinfo")):
            shutil.copy2(built, out / built.name)
        return out / deb.name, str(done.stdout)
    finally:
        safe_rmtree(work)
