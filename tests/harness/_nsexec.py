"""Mount the container's root, then exec systemd-nspawn (inside `unshare -m --propagation private`).

Usage: _nsexec.py --bind SRC DST [--overlay LOWER UPPER WORK MERGED] -- ARGV...

A separate tiny program rather than `sh -c 'mount ... && exec "$@"'` (ct-boot.sh): argv
lists only, and an error names the failed mount.  Because the mount namespace is
private and dies with nspawn, none of these mounts can outlive the container.
"""

from __future__ import annotations

import os
import subprocess
import sys


def main(args: list[str]) -> int:
    sep = args.index("--")
    opts, argv = args[:sep], args[sep + 1 :]
    mounts: list[list[str]] = []
    i = 0
    while i < len(opts):
        if opts[i] == "--bind":
            # Non-recursive: a recursive bind of / drags the host's /dev, /proc and /run
            # into the container (--volatile=state then fails on /dev).
            mounts.append(["mount", "--bind", opts[i + 1], opts[i + 2]])
            i += 3
        elif opts[i] == "--overlay":
            lower, upper, work, merged = opts[i + 1 : i + 5]
            mounts.append(["mount", "-t", "overlay", "overlay", "-o",
                           f"lowerdir={lower},upperdir={upper},workdir={work}", merged])
            i += 5
        else:
            print(f"_nsexec: unknown option {opts[i]!r}", file=sys.stderr)
            return 2
    for cmd in mounts:
        if subprocess.run(cmd, check=False).returncode != 0:
            print(f"_nsexec: {cmd} failed", file=sys.stderr)
            return 1
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
