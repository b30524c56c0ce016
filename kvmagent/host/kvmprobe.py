"""Does /dev/kvm actually work?  Run a tiny guest and see.

/dev/kvm can exist, open and answer KVM_GET_API_VERSION while guests do not
really run: on one nested host a vCPU ran at about 1 million instructions
per second, so QEMU -accel kvm seemed to hang in the kernel decompressor.
So accel = "auto" runs a small real-mode program in a forked child: count
ecx down from 2**24 (about 10-20 ms on working KVM, 30 s on that host),
then ``out 0x10, 0x42`` and ``hlt``.  The parent SIGKILLs the child when it
does not report back in time.  Only the stdlib is used.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import select
import signal
import struct
import time

KVM_API_VERSION = 12
KVMIO = 0xAE

# Sizes of the structures passed to the ioctls below (x86_64), checked
# against <linux/kvm.h> in tests/unit/test_kvmprobe.py.
SIZEOF_USERSPACE_MEMORY_REGION = 32  # u32 slot, flags; u64 gpa, size, uaddr
SIZEOF_REGS = 144  # 18 x u64: rax..r15, rip, rflags
SIZEOF_SREGS = 312  # 8 kvm_segment, 2 kvm_dtable, 7 x u64, u64 bitmap[4]


def _ioc(direction: int, nr: int, size: int) -> int:
    """Linux _IOC() on x86: dir:2 | size:14 | type:8 | nr:8."""
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(0, nr, 0)


def _iow(nr: int, size: int) -> int:
    return _ioc(1, nr, size)


def _ior(nr: int, size: int) -> int:
    return _ioc(2, nr, size)


KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, SIZEOF_USERSPACE_MEMORY_REGION)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, SIZEOF_REGS)
KVM_SET_REGS = _iow(0x82, SIZEOF_REGS)
KVM_GET_SREGS = _ior(0x83, SIZEOF_SREGS)
KVM_SET_SREGS = _iow(0x84, SIZEOF_SREGS)

KVM_EXIT_IO = 2

# Offsets in struct kvm_run, kvm_sregs and kvm_regs.
RUN_EXIT_REASON = 8
RUN_IO = 32  # struct { u8 direction, size; u16 port; u32 count; u64 data_offset; }
SREGS_CS_BASE = 0  # cs is the first kvm_segment: u64 base, u32 limit, u16 selector
SREGS_CS_SELECTOR = 12
REGS_RIP = 128
REGS_RFLAGS = 136

GUEST_ADDR = 0x1000
TEST_PORT = 0x10
TEST_VALUE = 0x42
LOOP_COUNT = 1 << 24


def guest_code(loop_count: int) -> bytes:
    """16-bit code: count ecx down to 0, write 0x42 to port 0x10, halt."""
    return (b"\x66\xB9" + struct.pack("<I", loop_count)  # mov ecx, loop_count
            + b"\x66\x49"  # loop: dec ecx
            + b"\x75\xFC"  # jnz loop
            + bytes((0xB0, TEST_VALUE))  # mov al, 0x42
            + bytes((0xE6, TEST_PORT))  # out 0x10, al
            + b"\xF4")  # hlt


def _run_test_guest(device: str, code: bytes) -> str:
    """The child's work: returns "ok" or why not.  May hang in KVM_RUN."""
    kvm = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    version = fcntl.ioctl(kvm, KVM_GET_API_VERSION)
    if version != KVM_API_VERSION:
        return f"KVM API version {version}, expected {KVM_API_VERSION}"
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    memory = mmap.mmap(-1, mmap.PAGESIZE)
    memory[:len(code)] = code
    address = _buffer_address(memory)
    region = struct.pack("=IIQQQ", 0, 0, GUEST_ADDR, mmap.PAGESIZE, address)
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)
    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    run_size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE)
    run = mmap.mmap(vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    sregs = bytearray(SIZEOF_SREGS)
    fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs)
    struct.pack_into("=Q", sregs, SREGS_CS_BASE, 0)
    struct.pack_into("=H", sregs, SREGS_CS_SELECTOR, 0)
    fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
    regs = bytearray(SIZEOF_REGS)
    struct.pack_into("=Q", regs, REGS_RIP, GUEST_ADDR)
    struct.pack_into("=Q", regs, REGS_RFLAGS, 2)  # bit 1 is always set
    fcntl.ioctl(vcpu, KVM_SET_REGS, bytes(regs))

    fcntl.ioctl(vcpu, KVM_RUN, 0)
    (reason,) = struct.unpack_from("=I", run, RUN_EXIT_REASON)
    if reason != KVM_EXIT_IO:
        return f"a test vCPU stopped with exit reason {reason}, expected KVM_EXIT_IO"
    _direction, size, port, _count, offset = struct.unpack_from("=BBHIQ", run, RUN_IO)
    value = run[offset] if size == 1 and offset < run_size else None
    if port != TEST_PORT or value != TEST_VALUE:
        return (f"a test vCPU wrote {value!r} to port {port:#x}, "
                f"expected {TEST_VALUE:#x} to {TEST_PORT:#x}")
    return "ok"


def _buffer_address(buffer: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def _child(device: str, code: bytes, report: int) -> None:
    """Runs in the forked child; never returns."""
    status = 1
    try:
        try:
            message = _run_test_guest(device, code)
        except OSError as e:
            message = f"KVM test failed: {e.strerror or e}"
        except Exception as e:  # anything else: report it, don't hang
            message = f"KVM test failed: {e!r}"
        os.write(report, message.encode()[:4000])
        status = 0
    finally:
        os._exit(status)


def _reap(pid: int, deadline: float) -> None:
    """Wait for the child until deadline at most."""
    while os.waitpid(pid, os.WNOHANG) == (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)


def kvm_usable(timeout: float = 2.0, device: str = "/dev/kvm") -> tuple[bool, str]:
    """Return (usable, reason); reason is "ok" or a sentence for the admin."""
    try:
        os.close(os.open(device, os.O_RDWR | os.O_CLOEXEC))
    except FileNotFoundError:
        return False, f"no {device} (module kvm_intel/kvm_amd not loaded?)"
    except OSError as e:
        return False, f"cannot open {device}: {e.strerror}"

    code = guest_code(LOOP_COUNT)
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child exits in _child
        os.close(read_end)
        _child(device, code, write_end)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], timeout)
        message = os.read(read_end, 4096).decode(errors="replace") if ready else ""
    finally:
        os.close(read_end)
    if ready:
        _reap(pid, time.monotonic() + 1.0)
        if not message:
            return False, "the KVM test process died without a result"
        return message == "ok", message
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError as e:  # pragma: no cover - it exited just now
        if e.errno != errno.ESRCH:
            raise
    # SIGKILL ends a task in KVM_RUN at once (measured: the probe returns
    # 15 ms after the timeout); should it not, don't block the caller.
    _reap(pid, time.monotonic() + 0.5)
    return False, (f"a test vCPU did not finish within {timeout:g} s "
                   "(nested virtualisation not working?)")
