"""The migratable CPU model and the pinned machine type, in a test host of
each release (Debian 12: QEMU 7.2; Debian 13: QEMU 10.0), with the tiny
guest under TCG.

A guest with the default cpu boots and sees Westmere's features (x86-64-v2
and AES), with no TCG warning; its first start pins what "pc" is on that
release, shown by `kvmagent show` and in QEMU's own argv (/proc/PID/cmdline).
The upgrade from Debian 12 to 13, done honestly: the pin file the Debian 12
host wrote is copied into the Debian 13 host (whose "pc" is
pc-i440fx-10.0), and the guest starts there with pc-i440fx-7.2 and boots.
The other way (a pin of Debian 13's pc-i440fx-10.0 on Debian 12's QEMU)
fails the start, naming the guest, the type and the file.  A changed
machine re-pins, and `kvmagent repin` makes the next start pin anew."""

from __future__ import annotations

import json
import time

import pytest

from tests.harness import TestHost
from tests.harness.install import copy_guest, define_guest, guest_toml
from tests.harness.install import install_on_release
from tests.system.test_kvm_service import qemu_pid, show, wait_for, wait_state

pytestmark = pytest.mark.system

NAME, UNIT = "mig", "kvm@mig.service"
PIN = f"/var/lib/kvmagent/machine/{NAME}.json"
NEWEST_PC = {"bookworm": "pc-i440fx-7.2", "trixie": "pc-i440fx-10.0"}
# What each release's host wrote, for the other (bookworm's tests run first:
# conftest's debian_testhost has the releases in that order).
PINS: dict[str, str] = {}


def qemu_argv(th: TestHost) -> list[str]:
    raw = th.exec(["cat", f"/proc/{qemu_pid(th, NAME)}/cmdline"]).stdout
    return raw.rstrip("\0").split("\0")


def option(argv: list[str], opt: str) -> str:
    return argv[argv.index(opt) + 1]


def boot(th: TestHost) -> list[str]:
    """Start the guest, wait for its shell; QEMU's argv."""
    since = th.exec(["date", "+%Y-%m-%d %H:%M:%S"]).stdout.strip()
    th.exec(["systemctl", "start", UNIT], timeout=120)
    wait_for(th, UNIT, r"GUEST-READY", timeout=120)
    assert th.journal(UNIT).count("GUEST-READY") >= 1
    journal = th.exec(["journalctl", "-u", UNIT, "--since", since, "-o", "cat",
                       "--no-pager"]).stdout
    assert "TCG doesn't support" not in journal and "qemu-system-x86_64: warning" not in journal, \
        journal[-3000:]
    return qemu_argv(th)


def stop(th: TestHost) -> None:
    th.exec(["kvmagent", "stop", "--force", NAME], timeout=60)
    wait_state(th, UNIT, ("inactive", "failed"))
    th.exec(["systemctl", "reset-failed", UNIT], check=False)


def shown(th: TestHost) -> dict[str, object]:
    return dict(json.loads(th.run(["kvmagent", "show", "--json", NAME]).stdout))


def test_default_cpu_and_pinned_machine(debian_testhost: TestHost,
                                        guest_image) -> None:  # type: ignore[no-untyped-def]
    th = debian_testhost
    release = th.release
    newest = NEWEST_PC[release]
    install_on_release(th)
    th.exec(["rm", "-f", PIN])
    image = copy_guest(th, guest_image)
    define_guest(th, NAME, guest_toml(image, nics=0))
    doc = shown(th)
    assert (doc["machine"], doc["cpu"], doc["pin"]) == (newest, "Westmere", {"file": PIN})

    # the first start: the default CPU model boots, "pc" is pinned
    t0 = time.monotonic()
    argv = boot(th)
    booted = time.monotonic() - t0
    assert (option(argv, "-machine"), option(argv, "-cpu")) == (newest, "Westmere")
    th.run(["kvmagent", "console", NAME, "--timeout", "0.5"],
           input="grep -m1 flags /proc/cpuinfo | tr ' ' '\\n' | "
                 "grep -cx -e ssse3 -e sse4_1 -e sse4_2 -e popcnt -e cx16 -e aes "
                 "| sed 's/^/CPU-FLAGS-/'\n")
    wait_for(th, UNIT, r"CPU-FLAGS-6\b", timeout=60)
    assert f'guest {NAME}: machine "pc" pinned to {newest}' in th.journal(UNIT)
    assert json.loads(th.exec(["cat", PIN]).stdout) == {"requested": "pc", "machine": newest}
    assert th.exec(["stat", "-c", "%a %U", PIN]).stdout.split() == ["644", "root"]
    assert shown(th)["pin"] == {"file": PIN, "requested": "pc", "machine": newest}
    text = th.run(["kvmagent", "show", NAME]).stdout
    assert f'# machine "pc" is pinned to {newest} ({PIN})' in text
    stop(th)
    PINS[release] = th.exec(["cat", PIN]).stdout
    print(f"{release}: the default cpu Westmere booted in {booted:.1f} s (TCG), "
          f"pc pinned to {newest}")

    if release == "trixie":
        # the upgrade: the pin that Debian 12's host wrote, on Debian 13
        assert "bookworm" in PINS, "the Debian 12 case must run first (it writes the pin)"
        th.write_file(PIN, PINS["bookworm"])
        argv = boot(th)
        assert option(argv, "-machine") == "pc-i440fx-7.2"
        assert shown(th)["machine"] == "pc-i440fx-7.2"
        stop(th)
        assert th.exec(["cat", PIN]).stdout == PINS["bookworm"]  # kept as it was
        print("trixie: the guest pinned on Debian 12 started with pc-i440fx-7.2 on QEMU 10.0")
    else:
        # the other way: Debian 13's type on Debian 12's QEMU
        th.write_file(PIN, json.dumps({"requested": "pc", "machine": "pc-i440fx-10.0"}))
        th.exec(["systemctl", "start", UNIT], timeout=120, check=False)
        # exit status 5 (host not ready), which systemd restarts: stopped here
        journal = wait_for(th, UNIT, r"code=exited, status=5/", timeout=60)
        th.exec(["systemctl", "stop", UNIT], timeout=60)
        th.exec(["systemctl", "reset-failed", UNIT], check=False)
        assert (f'guest {NAME}: machine = "pc" (/etc/kvmagent/guests/{NAME}.toml) is pinned '
                f"to pc-i440fx-10.0 ({PIN}), which QEMU 7.2") in journal, journal[-3000:]
        assert "GUEST-READY" not in journal.split("is pinned to pc-i440fx-10.0")[1]
        th.write_file(PIN, PINS["bookworm"])

    # another machine in the file re-pins, said in the journal
    define_guest(th, NAME, guest_toml(image, nics=0, top='machine = "q35"'))
    argv = boot(th)
    q35 = newest.replace("i440fx", "q35")
    assert option(argv, "-machine") == q35
    assert 'machine changed from "pc" (pinned to ' in th.journal(UNIT)
    assert f'to "q35": re-pinned to {q35}' in th.journal(UNIT)
    stop(th)
    # kvmagent repin: the next start pins what the alias is now
    out = th.run(["kvmagent", "repin", NAME]).stdout
    assert out.startswith(f'guest {NAME}: unpinned (was {q35}); its next start pins machine '
                          f'"q35" to {q35} (in QEMU '), out
    assert th.exec(["test", "-e", PIN], check=False).returncode == 1
    assert "is not pinned yet: the next start pins it to " + q35 in th.run(
        ["kvmagent", "show", NAME]).stdout
    th.exec(["rm", f"/etc/kvmagent/guests/{NAME}.toml"])
    assert show(th, UNIT, "ActiveState")["ActiveState"] == "inactive"
