from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from kvmagent.config.guests import load_guest, load_host_config
from kvmagent.config.model import Guest
from kvmagent.paths import Paths


class ConfDir:
    """A throwaway /etc/kvmagent: write files, load guests."""

    def __init__(self, root: Path) -> None:
        self.paths = Paths(root / "etc", root / "state", root / "run")
        (root / "etc" / "guests").mkdir(parents=True)

    def write(self, rel: str, text: str) -> Path:
        path = self.paths.config_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path

    def guest(self, name: str = "g") -> Guest:
        return load_guest(self.paths, name, load_host_config(self.paths))


@pytest.fixture
def conf(tmp_path: Path) -> ConfDir:
    return ConfDir(tmp_path)
