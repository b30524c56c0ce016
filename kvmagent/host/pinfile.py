"""Where a guest's pinned machine type is kept (kvmagent.render.pin decides
it): STATE_DIR/machine/NAME.json, {"requested": "pc", "machine":
"pc-i440fx-7.2"}.  The state directory, not /etc: the guest's file is the
admin's, and kvm@.service writes only its StateDirectory=.  Removing the
file (`kvmagent repin NAME`) re-pins the guest at its next start to what
its machine means then (docs/kvmagent.1.md)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from kvmagent.errors import KvmagentError, host_error
from kvmagent.render.pin import Pin

PIN_DIR = "machine"


def pin_file(state_dir: Path, name: str) -> Path:
    return state_dir / PIN_DIR / f"{name}.json"


def read_pin(path: Path) -> Pin | None:
    """The pin kept in PATH; None when there is none.  A file that is not a
    pin is a host error: silently re-pinning would change the guest's
    hardware."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        pin = Pin(str(doc["requested"]), str(doc["machine"]))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise host_error(f"{path}: cannot read the pinned machine type: {e.strerror}") from None
    except (ValueError, KeyError, TypeError):
        raise host_error(f"{path}: not a pinned machine type",
                         f"kvmagent repin {path.stem} removes it: the next start pins "
                         "the machine type anew") from None
    return pin


def write_pin(path: Path, pin: Pin) -> None:
    """Atomically (a temporary file renamed over it); readable by all, as
    `kvmagent show` of a user who may read the guest's file shows it."""
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".pin-", dir=path.parent)
    except OSError as e:
        raise _unwritable(path, e) from None
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(pin._asdict(), f)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _unwritable(path, e) from None


def _unwritable(path: Path, e: OSError) -> KvmagentError:
    return host_error(f"{path}: cannot keep the pinned machine type: {e.strerror}",
                      "the state directory must be writable by root")
