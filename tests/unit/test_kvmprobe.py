"""kvmagent.host.kvmprobe: ioctl numbers, the test program, and real probes.

The ioctl numbers and struct sizes below were printed by a C program
compiled against linux-libc-dev 6.1 (<linux/kvm.h>) on x86_64.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmagent.host import kvmprobe

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("name", "value"), [
    ("KVM_GET_API_VERSION", 0xAE00),
    ("KVM_CREATE_VM", 0xAE01),
    ("KVM_GET_VCPU_MMAP_SIZE", 0xAE04),
    ("KVM_CREATE_VCPU", 0xAE41),
    ("KVM_SET_USER_MEMORY_REGION", 0x4020AE46),
    ("KVM_RUN", 0xAE80),
    ("KVM_GET_REGS", 0x8090AE81),
    ("KVM_SET_REGS", 0x4090AE82),
    ("KVM_GET_SREGS", 0x8138AE83),
    ("KVM_SET_SREGS", 0x4138AE84),
])
def test_ioctl_numbers_match_linux_kvm_h(name: str, value: int) -> None:
    assert getattr(kvmprobe, name) == value


def test_struct_layout_matches_linux_kvm_h() -> None:
    assert kvmprobe.SIZEOF_USERSPACE_MEMORY_REGION == 32
    assert kvmprobe.SIZEOF_REGS == 144
    assert kvmprobe.SIZEOF_SREGS == 312
    assert (kvmprobe.RUN_EXIT_REASON, kvmprobe.RUN_IO) == (8, 32)
    assert (kvmprobe.REGS_RIP, kvmprobe.REGS_RFLAGS) == (128, 136)
    assert kvmprobe.SREGS_CS_SELECTOR == 12


def test_guest_code_loops_then_writes_0x42_to_port_0x10() -> None:
    code = kvmprobe.guest_code(0x01020304)
    assert code[:6] == b"\x66\xb9\x04\x03\x02\x01"  # mov ecx, 0x01020304
    loop = code.index(b"\x66\x49")  # dec ecx
    jnz = code.index(b"\x75")
    assert jnz + 2 + (code[jnz + 1] - 256) == loop  # jnz jumps back to dec
    assert code[jnz + 2:] == b"\xb0\x42\xe6\x10\xf4"  # mov al,0x42; out 0x10,al; hlt
    assert len(code) < 4096


def test_missing_device() -> None:
    assert kvmprobe.kvm_usable(device="/nonexistent/kvm") == (
        False, "no /nonexistent/kvm (module kvm_intel/kvm_amd not loaded?)")


def test_device_that_cannot_be_opened(tmp_path: Path) -> None:
    assert kvmprobe.kvm_usable(device=str(tmp_path)) == (
        False, f"cannot open {tmp_path}: Is a directory")


def test_device_that_is_not_kvm() -> None:
    usable, reason = kvmprobe.kvm_usable(device="/dev/null")
    assert not usable
    assert reason == "KVM test failed: Inappropriate ioctl for device"


@pytest.mark.root
def test_permission_denied_for_an_unprivileged_user() -> None:
    """As nobody, on a KVM device node only root may open (made here, so
    neither the mode of this machine's /dev/kvm nor its absence matters),
    with kvmagent copied where nobody can read it (the checkout may lie
    where other users cannot enter)."""
    with tempfile.TemporaryDirectory(prefix="kvmagent-probe-") as tmp:
        top = Path(tmp)
        top.chmod(0o755)
        shutil.copytree(REPO / "kvmagent", top / "kvmagent", copy_function=shutil.copyfile,
                        ignore=shutil.ignore_patterns("__pycache__"))
        for path in (top / "kvmagent").rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        (top / "kvmagent").chmod(0o755)
        device = top / "kvm"
        os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(10, 232))  # /dev/kvm's numbers
        code = f"from kvmagent.host.kvmprobe import kvm_usable; print(kvm_usable(device={str(device)!r}))"
        result = subprocess.run(
            [sys.executable, "-c", code], user=65534, group=65534, extra_groups=[], cwd=top,
            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": tmp},
            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"(False, 'cannot open {device}: Permission denied')"


@pytest.mark.kvm  # skipped, saying so, where this user cannot open /dev/kvm
def test_real_probe_returns_within_timeout() -> None:
    started = time.monotonic()
    usable, reason = kvmprobe.kvm_usable(timeout=2.0)
    elapsed = time.monotonic() - started
    assert isinstance(usable, bool) and isinstance(reason, str)
    assert usable == (reason == "ok")
    assert elapsed < 3.0, f"took {elapsed:.2f} s: {reason}"


@pytest.mark.kvm  # skipped, saying so, where this user cannot open /dev/kvm
def test_a_vcpu_that_runs_too_long_is_killed_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # 2**32 - 1 iterations take more than a second even on bare metal.
    monkeypatch.setattr(kvmprobe, "LOOP_COUNT", 0xFFFFFFFF)
    started = time.monotonic()
    result = kvmprobe.kvm_usable(timeout=0.5)
    elapsed = time.monotonic() - started
    assert result == (False, "a test vCPU did not finish within 0.5 s "
                             "(nested virtualisation not working?)")
    assert elapsed < 1.5


@pytest.mark.kvm  # skipped, saying so, where this user cannot open /dev/kvm
def test_the_ioctl_sequence_runs_a_short_program(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no loop the program needs a few instructions; this passes even
    where KVM is very slow (nested), and fails only if KVM cannot run a
    vCPU at all or our ioctls/structures are wrong."""
    monkeypatch.setattr(kvmprobe, "LOOP_COUNT", 1)
    assert kvmprobe.kvm_usable(timeout=5.0) == (True, "ok")


def _children() -> set[str]:
    tasks = Path(f"/proc/{os.getpid()}/task")
    return {pid for task in tasks.iterdir() for pid in (task / "children").read_text().split()}


@pytest.fixture(autouse=True)
def no_child_left() -> Iterator[None]:
    """The probe must reap (or at least kill) its child before returning."""
    before = _children()
    yield
    assert _children() <= before
