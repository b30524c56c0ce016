"""The MESSAGE_IDs of the supervisor's lifecycle messages: `journalctl
MESSAGE_ID=...` finds them, catalog/kvmagent.catalog explains each
(journalctl -x); a unit test keeps the two in step."""

MSG_STARTING = "4c2e3a0c6d0b4f0e9b7e3f2a1d5c6b01"
MSG_RUNNING = "4c2e3a0c6d0b4f0e9b7e3f2a1d5c6b02"
MSG_POWERDOWN = "4c2e3a0c6d0b4f0e9b7e3f2a1d5c6b03"
MSG_POWEREDOFF = "4c2e3a0c6d0b4f0e9b7e3f2a1d5c6b04"
MSG_CRASHED = "4c2e3a0c6d0b4f0e9b7e3f2a1d5c6b05"
MSG_WATCHDOG = "4c2e3a0c6d0b4f0e9b7e3f2a1d5c6b06"
MSG_PANIC = "4c2e3a0c6d0b4f0e9b7e3f2a1d5c6b07"
MSG_STOPPED = "4c2e3a0c6d0b4f0e9b7e3f2a1d5c6b08"
MSG_START_FAILED = "4c2e3a0c6d0b4f0e9b7e3f2a1d5c6b09"
MSG_CONSOLE_DROPPED = "4c2e3a0c6d0b4f0e9b7e3f2a1d5c6b0a"
MSG_ADOPTED = "4c2e3a0c6d0b4f0e9b7e3f2a1d5c6b0b"
MSG_RELOADED = "4c2e3a0c6d0b4f0e9b7e3f2a1d5c6b0c"
MSG_FAILED_QEMU_KEPT = "4c2e3a0c6d0b4f0e9b7e3f2a1d5c6b0e"
MSG_MIGRATED = "4c2e3a0c6d0b4f0e9b7e3f2a1d5c6b0f"
MSG_MIGRATED_IN = "4c2e3a0c6d0b4f0e9b7e3f2a1d5c6b10"
