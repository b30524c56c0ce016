"""tests/libs: kvmagent's adapters against the libraries they reach into, as
installed (pystemd's D-Bus module and signature table, pydbus and gi,
pyroute2's modules loaded without its package __init__).  No root, no bus:
what changes between Debian 12's and 13's versions of those libraries shows
here, and they run in the package's build on both releases."""

from tests.unit.conftest import ConfDir, conf  # noqa: F401  (the same throwaway /etc/kvmagent)
