"""kvmagent: KVM/QEMU guests as ordinary systemd services."""

__version__ = "0.1.0"
