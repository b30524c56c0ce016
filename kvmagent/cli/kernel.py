"""`kvmagent kernel NAME --from-host [VERSION]`: the host's kernel and
initrd (/boot/vmlinuz-VERSION, /boot/initrd.img-VERSION; by default the
running kernel, or the newest installed one) copied into
/boot/kvm/NAME/ (vmlinuz, initrd.img, mode 0644, each replaced
atomically), and the guest pointed at them by a drop-in,
guests/NAME.toml.d/kernel.toml (kvmagent.render.hostkernel): the guest's
own file stays as the admin wrote it.  The result is checked as validate
checks the guest before anything is written."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from kvmagent.config.guests import build_guest, load_guest, load_host_config
from kvmagent.config.layers import Layered, dropin_files, merge_into, parse_toml, read_toml
from kvmagent.errors import ExitStatus, KvmagentError, config_error, host_error
from kvmagent.paths import Paths
from kvmagent.render import hostkernel


def _write_atomic(target: Path, data: bytes, mode: int) -> None:
    """TARGET replaced by DATA at once (a temporary file beside it, renamed)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        raise KvmagentError(f"{target}: cannot write: {e.strerror}") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def choose(version: str, boot: Path) -> tuple[str, Path, Path | None]:
    """VERSION ("": the running kernel, or the newest installed), its
    vmlinuz and its initrd (None if it has none); a host error (exit 5)
    naming what is not installed."""
    try:
        names = os.listdir(boot)
    except OSError as e:
        raise host_error(f"{boot}: {e.strerror}") from None
    versions = hostkernel.installed(names)
    if not version:
        picked = hostkernel.pick_version(versions, os.uname().release)
        if picked is None:
            raise host_error(f"no kernel installed in {boot} (no {boot}/vmlinuz-VERSION)",
                             "apt-get install linux-image-amd64")
        version = picked
    image = boot / f"vmlinuz-{version}"
    if "/" in version or version not in versions or not image.is_file():
        raise host_error(f"kernel {version!r} is not installed: no {image}",
                         "installed: " + (", ".join(versions) or "none"))
    initrd = boot / f"initrd.img-{version}"
    return version, image, initrd if initrd.is_file() else None


def check_dropin(paths: Paths, name: str, text: str) -> None:
    """The guest as it will be with the drop-in (in its place among the
    others): valid, and booting the copied kernel."""
    host = load_host_config(paths)
    main = paths.guest_config(name)
    dropin = main.with_name(main.name + ".d") / hostkernel.DROPIN
    files = sorted({*dropin_files(main), dropin}, key=lambda p: p.name.encode())
    layered = Layered()
    for path in [main, *files]:
        data = parse_toml(text.encode(), path) if path == dropin else read_toml(path)
        merge_into(layered, data, str(path))
        layered.files.append(path)
    guest = build_guest(name, layered, host, main)
    assert guest.kernel is not None
    wanted = parse_toml(text.encode(), dropin)["kernel"]["image"]
    if str(guest.kernel.image) != wanted:
        raise config_error(f"{guest.origin_of('kernel.image')}: kernel.image = "
                           f"\"{guest.kernel.image}\" overrides {dropin} (a later drop-in)",
                           "remove kernel.image from that file; nothing written")


def install(paths: Paths, name: str, version: str, boot: Path = hostkernel.BOOT,
            kernels: Path = hostkernel.GUEST_KERNELS) -> tuple[str, Path, list[Path]]:
    """Copy the kernel and write the drop-in: (version, drop-in, files copied)."""
    load_guest(paths, name, load_host_config(paths))  # exit 8: no such guest
    version, image, initrd = choose(version, boot)
    target = hostkernel.guest_kernel_dir(name, kernels)
    text = hostkernel.dropin_text(name, version, target, initrd is not None)
    check_dropin(paths, name, text)
    try:
        target.mkdir(mode=0o755, parents=True, exist_ok=True)
        copied = []
        for source, dest in ((image, target / hostkernel.IMAGE),
                             (initrd, target / hostkernel.INITRD)):
            if source is not None:
                _write_atomic(dest, source.read_bytes(), 0o644)
                copied.append(dest)
        main = paths.guest_config(name)
        dropins = main.with_name(main.name + ".d")
        dropins.mkdir(mode=0o755, exist_ok=True)
        dropin = dropins / hostkernel.DROPIN
        _write_atomic(dropin, text.encode(), 0o644)
    except OSError as e:
        raise KvmagentError(f"{e.filename}: {e.strerror}") from None
    return version, dropin, copied


def cmd_kernel(args: argparse.Namespace, paths: Paths) -> int:
    if args.from_host is None:
        raise KvmagentError("say where the kernel comes from: --from-host [VERSION]",
                            f"kvmagent kernel {args.name} --from-host", ExitStatus.USAGE)
    version, dropin, copied = install(paths, args.name, args.from_host)
    for path in copied:
        print(f"{args.name}: {path} (kernel {version})")
    print(f"kvmagent: wrote {dropin}: [kernel] image and initrd of guest {args.name} point "
          "there; it boots them from its next start", file=sys.stderr)
    return ExitStatus.OK
