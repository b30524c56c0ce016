"""kvmagent.host.qemucaps against the real qemu-system-x86_64 of this host: the
probe answers, its answer has everything the command line of every seed
configuration uses, and the recorded answer the unit tests use is still
what this QEMU says (when it is the recorded version)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from kvmagent.host import qemucaps
from kvmagent.config.guests import load_guest, load_host_config
from kvmagent.config.model import Accel
from kvmagent.render.qemu import HostFacts
from tests import seed
from tests.guest.qemu_helpers import qemu_available

pytestmark = pytest.mark.qemu

SEED = seed.copy(Path("/nonexistent/state"), Path("/nonexistent/run"))  # whoever owns the checkout
SEED_GUESTS = seed.SEED_GUESTS
RECORDED = Path(__file__).parent.parent / "unit" / "data" / "qemucaps" / "qemu-7.2.qmp"


@pytest.fixture(scope="module")
def caps() -> qemucaps.QemuCaps:
    if not qemu_available():
        pytest.skip("qemu-system-x86_64 is not installed: run `make setup`")
    return qemucaps.probe(load_host_config(SEED).qemu)


def test_the_installed_qemu_answers(caps: qemucaps.QemuCaps) -> None:
    assert caps.version[0] in (7, 10), caps.name  # Debian 12 and 13
    assert {"pc", "q35"} <= caps.machines and "tcg" in caps.accels


@pytest.mark.parametrize("name", SEED_GUESTS)
def test_it_has_what_every_seed_configuration_uses(caps: qemucaps.QemuCaps, name: str) -> None:
    host = load_host_config(SEED)
    guest = load_guest(SEED, name, host)
    for accel in (Accel.KVM, Accel.TCG):
        assert qemucaps.qemu_problems(guest, host, HostFacts(accel), caps) == []


def test_the_recording_is_this_qemus_answer(caps: qemucaps.QemuCaps) -> None:
    recorded = qemucaps.parse_transcript(caps.binary, RECORDED.read_text())
    if recorded.version != caps.version:
        pytest.skip(f"recorded from QEMU {recorded.version}, this is {caps.name}")
    assert dataclasses.replace(recorded, package=caps.package) == caps


def test_the_cache_spares_a_start_the_probe(tmp_path: Path, caps: qemucaps.QemuCaps,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Prints what each costs (pytest -s); asserts only that the cached
    path is much cheaper than asking QEMU."""
    qemu = Path(caps.binary)
    monkeypatch.setattr(qemucaps, "_MEMO", {})
    start = time.perf_counter()
    assert qemucaps.capabilities(qemu, tmp_path) == caps
    probed = time.perf_counter() - start
    monkeypatch.setattr(qemucaps, "_MEMO", {})
    start = time.perf_counter()
    assert qemucaps.capabilities(qemu, tmp_path) == caps
    cached = time.perf_counter() - start
    print(f"probe {probed * 1000:.1f} ms, cached {cached * 1000:.2f} ms")
    assert cached < probed / 5
