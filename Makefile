# kvmagent: the commands README.md documents.  Run as root on Debian 12 or 13.
#
# Debian's python3 and a plain PATH on purpose: a pyenv (or other) python3
# first on PATH must never be used, neither for the tests nor for packaging.
PYTHON := /usr/bin/python3
export PATH := /usr/sbin:/usr/bin:/sbin:/bin
export DEBIAN_FRONTEND := noninteractive

# What the project and its tests need, from Debian only (xorriso, isolinux and
# syslinux-common: the installer ISO that tests/system/test_install_iso.py builds;
# lvm2: clone's volumes).
DEB_DEPS := python3-pystemd python3-pydbus python3-pyroute2 python3-systemd python3-gi lvm2 \
	python3-pytest qemu-system-x86 qemu-utils ipxe-qemu seabios systemd systemd-container \
	dbus debootstrap busybox-static iproute2 python3-hypothesis man-db \
	python3-mypy python3-flake8 xorriso isolinux syslinux-common
# The package is built in a clean build root of each release (debootstrap, then
# its Build-Depends), never with what this machine has: the host needs git only.
DEB_BUILD_DEPS := git

.PHONY: setup check lint unit demo bench deb clean-tests

setup:
	apt-get install -y -q --no-install-recommends $(DEB_DEPS) $(DEB_BUILD_DEPS)
	$(PYTHON) tests/guest/build.py
	$(PYTHON) -m tests.harness setup

check: setup
	$(MAKE) --no-print-directory lint
	$(PYTHON) -m pytest tests

# Types (mypy, configured in pyproject.toml) and flake8 (.flake8), Debian's own
# versions; kvmagent/ is kept clean on Debian 12's and 13's.
lint:
	$(PYTHON) -m mypy
	$(PYTHON) -m flake8 kvmagent tests bench docs

unit:
	$(PYTHON) -m pytest tests/unit

# The main job; `make demo RELEASE=trixie` shows it on Debian 13.
RELEASE ?= bookworm
demo: setup
	$(PYTHON) -m tests.harness demo --release $(RELEASE)

# Benchmarks (printed tables, not tests): taps over netlink vs ip; start and
# stop of a guest, bare QEMU vs kvmagent; the supervisors' memory; live migration;
# where one supervisor's memory goes; 1, 10 and 50 guests, boot storm and host
# shutdown against libvirt (heavy: under the machine's lock, /tmp/kvmagent-heavy.lock).
bench: setup
	$(PYTHON) -m compileall -q kvmagent
	$(PYTHON) bench/bench_taps.py
	$(PYTHON) bench/bench_lifecycle.py
	$(PYTHON) bench/bench_list.py
	$(PYTHON) bench/bench_remote.py
	$(PYTHON) bench/bench_adoption.py
	$(PYTHON) bench/bench_migrate.py --transport ssh,tcp
	$(PYTHON) bench/supervisor_memory.py
	flock /tmp/kvmagent-heavy.lock $(PYTHON) bench/bench_scale.py --counts $(SCALE_COUNTS)

# Guests at once in bench_scale.py (memory and start); the largest count is
# also the boot storm's and the host shutdown's.  Quick: make bench SCALE_COUNTS=1,5
SCALE_COUNTS ?= 1,10,50

# The Debian package of the committed tree (git archive HEAD), built as Debian's
# builders do: in a clean root of each release (Debian 12 and 13) with only
# build-essential and the Build-Depends, as a user who is not root, without
# network, its build-time tests run; then lintian --pedantic of that release.
# Into build/bookworm/ and build/trixie/.
deb: setup
	rm -rf build/bookworm build/trixie
	$(PYTHON) -m tests.harness deb --out build

# Remove whatever an interrupted test run left behind (containers, mounts, netns).
clean-tests:
	$(PYTHON) -m tests.harness cleanup
