# kvmagent: the commands README.md documents.  Run as root on Debian 12.
#
# Debian's python3 and a plain PATH on purpose: a pyenv (or other) python3
# first on PATH must never be used, neither for the tests nor for packaging.
PYTHON := /usr/bin/python3
export PATH := /usr/sbin:/usr/bin:/sbin:/bin
export DEBIAN_FRONTEND := noninteractive

# What the project and its tests need, from Debian only.
DEB_DEPS := python3-pystemd python3-pydbus python3-pyroute2 python3-systemd python3-gi \
	python3-pytest qemu-system-x86 qemu-utils ipxe-qemu seabios systemd systemd-container \
	dbus debootstrap busybox-static iproute2 python3-hypothesis
# What building the package needs (make deb, and tests/system/test_package.py).
DEB_BUILD_DEPS := debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
	python3-pytest python3-hypothesis build-essential fakeroot lintian man-db git

.PHONY: setup check unit demo bench deb clean-tests

setup:
	apt-get install -y -q --no-install-recommends $(DEB_DEPS) $(DEB_BUILD_DEPS)
	$(PYTHON) tests/guest/build.py
	$(PYTHON) -m tests.harness setup

check: setup
	$(PYTHON) -m pytest tests

unit:
	$(PYTHON) -m pytest tests/unit

demo: setup
	$(PYTHON) -m tests.harness demo

# Benchmarks (printed tables, not tests): taps over netlink vs ip; start and
# stop of a guest, bare QEMU vs kvmagent; the supervisors' memory.
bench: setup
	$(PYTHON) -m compileall -q kvmagent
	$(PYTHON) bench/bench_taps.py
	$(PYTHON) bench/bench_lifecycle.py
	$(PYTHON) bench/bench_list.py

# The Debian package, built from the committed tree (git archive) into build/.
deb:
	apt-get install -y -q --no-install-recommends $(DEB_BUILD_DEPS)
	rm -rf build/deb && mkdir -p build/deb
	git archive HEAD | tar -x -C build/deb
	cd build/deb && dpkg-buildpackage -us -uc -b
	lintian -I --pedantic build/kvmagent_*.changes

# Remove whatever an interrupted test run left behind (containers, mounts, netns).
clean-tests:
	$(PYTHON) -m tests.harness cleanup
