"""What `kvmagent import` makes runs in the real qemu-system-x86_64 (TCG):
each of the seed's six start scripts (tests/data/import/kvm-scripts) and
each Xen configuration (tests/data/import/xen) is imported, the TOML loaded
as `kvmagent validate` loads a guest, and the guest's argv started paused
(-S) as for the hand-written seed configurations (test_seed_in_qemu.py):
the disks the configurations name point at throwaway images, the kernels
at the tiny guest's."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from kvmagent.config.guests import build_guest
from kvmagent.config.layers import Layered
from kvmagent.config.model import HostConfig, NicMode
from kvmagent.foreign.importtoml import Imported
from kvmagent.foreign.kvmscript import import_kvm_script
from kvmagent.foreign.xenconfig import import_xen
from tests.guest.qemu_helpers import on_scratch, start_paused

pytestmark = pytest.mark.qemu

DATA = Path(__file__).resolve().parents[1] / "data" / "import"
SCRIPTS = sorted(p.name for p in (DATA / "kvm-scripts").glob("*.bash"))
XEN = sorted(p.name for p in (DATA / "xen").glob("*.cfg"))
IFUP = "/etc/kvm/kvm-ifup-local"  # the seed's tap script, kept beside the scripts


@pytest.fixture(scope="module")
def image(guest_image):  # type: ignore[no-untyped-def]
    return guest_image


def _read(path: str) -> str | None:
    return (DATA / "kvm-scripts" / "kvm-ifup-local").read_text() if path == IFUP else None


def _run(imported: Imported, image, tmp_path: Path) -> str:  # type: ignore[no-untyped-def]
    host = HostConfig()
    guest = build_guest(imported.name, Layered(data=tomllib.loads(imported.toml)), host,
                        Path(f"/etc/kvmagent/guests/{imported.name}.toml"))
    if any(n.mode is NicMode.BRIDGE for n in guest.nics) and os.geteuid() != 0:
        pytest.skip("a bridged NIC needs root (QEMU creates the tap in a private netns)")
    return start_paused(on_scratch(guest, image, tmp_path), host, tmp_path)


@pytest.mark.parametrize("script", SCRIPTS)
def test_imported_kvm_script_starts_paused(script: str, image, tmp_path: Path) -> None:
    text = (DATA / "kvm-scripts" / script).read_text()
    imported = import_kvm_script(text, script, name=script.removesuffix(".bash"), read=_read)
    stderr = _run(imported, image, tmp_path)
    assert "warning" not in stderr.lower(), stderr


@pytest.mark.parametrize("config", XEN)
def test_imported_xen_config_starts_paused(config: str, image, tmp_path: Path) -> None:
    imported = import_xen((DATA / "xen" / config).read_text(), config)
    stderr = _run(imported, image, tmp_path)
    assert "warning" not in stderr.lower(), stderr
