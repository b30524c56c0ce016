"""Throwaway systemd test hosts (systemd-nspawn) for kvmagent's system tests.

See testhost.py (TestHost), rootfs.py (the cached debian root) and __main__.py (the CLI).
"""

from .sysutil import CACHE_ROOT, STATE_ROOT, HarnessError
from .testhost import TestHost

__all__ = ["CACHE_ROOT", "STATE_ROOT", "HarnessError", "TestHost"]
