"""Placeholders for file descriptors in the QEMU command line of a guest's
plan (kvmagent.unit.startup makes the plan in a forked child; only the
supervisor knows the fd numbers, and fills them in when it starts QEMU).
Its own module so that neither side imports the other."""

from __future__ import annotations

QMP_FD = "\0qmp\0"
CONSOLE_FD = "\0console\0"


def tap_token(index: int) -> str:
    return f"\0tap{index}\0"


def disk_token(index: int, mode: str) -> str:
    return f"\0disk{index}{mode}\0"


def fill(arg: str, values: dict[str, str]) -> str:
    for token, value in values.items():
        arg = arg.replace(token, value)
    return arg
