"""ocf:kvmagent:guest's decisions (kvmagent.render.ocf): every OCF exit code
it returns, from plain facts, as the OCF standard and the heartbeat
VirtualDomain agent assign them; its meta-data; and the runner's paths that
need no systemd (usage, unknown action, bad parameters)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kvmagent.cli import ocf as runner
from kvmagent.render import ocf
from kvmagent.render.ocf import GuestFacts, Ocf, Outcome, Params, UnitFacts

REPO = Path(__file__).resolve().parents[2]
ENV = {"OCF_RESKEY_name": "web1", "OCF_RESKEY_CRM_meta_interval": "10000",
       "OCF_RESKEY_CRM_meta_timeout": "20000"}
GOOD = GuestFacts("/etc/kvmagent/guests/web1.toml", True, None)
MISSING = GuestFacts("/etc/kvmagent/guests/web1.toml", False, None)
BROKEN = GuestFacts("/etc/kvmagent/guests/web1.toml", True,
                    "/etc/kvmagent/guests/web1.toml: memory = '1X': not a size")


def unit(svc: str = "active", scope: str = "active", sub: str = "running",
         enabled: str = "disabled") -> UnitFacts:
    return UnitFacts(svc, sub, scope, enabled)


RUNNING, STOPPED = unit(), unit("inactive", "inactive", "dead")


def params(action: str = "monitor", **env: str) -> Params:
    p = ocf.params({**ENV, **env}, action)
    assert isinstance(p, Params), p
    return p


def test_the_codes_are_the_ocf_standards() -> None:
    assert [(c.name, c.value) for c in Ocf] == [
        ("SUCCESS", 0), ("ERR_GENERIC", 1), ("ERR_ARGS", 2), ("ERR_UNIMPLEMENTED", 3),
        ("ERR_PERM", 4), ("ERR_INSTALLED", 5), ("ERR_CONFIGURED", 6), ("NOT_RUNNING", 7),
        ("RUNNING_PROMOTED", 8), ("FAILED_PROMOTED", 9)]


def test_parameters() -> None:
    p = params("migrate_to", OCF_RESKEY_CRM_meta_migrate_target="node2",
               OCF_RESKEY_migration_user="admin", OCF_RESKEY_migration_network_suffix="-mig")
    assert (p.name, p.probe, p.timeout_ms) == ("web1", False, 20000)
    assert ocf.migration_host(p) == "admin@node2-mig"
    assert ocf.migration_host(params("migrate_to", OCF_RESKEY_CRM_meta_migrate_target="n2")) \
        == "n2"
    assert params("monitor", OCF_RESKEY_CRM_meta_interval="0").probe
    assert not params("monitor").probe and not params("start").probe


@pytest.mark.parametrize("env, word", [
    ({"OCF_RESKEY_name": ""}, "name is required"),
    ({"OCF_RESKEY_name": "Web 1"}, "name='Web 1' is not a guest name"),
    ({"OCF_RESKEY_migration_user": "a;b"}, "migration_user"),
    ({"OCF_RESKEY_migration_network_suffix": "-x y"}, "migration_network_suffix"),
])
def test_bad_parameters_are_not_configured(env: dict[str, str], word: str) -> None:
    found = ocf.params({**ENV, **env}, "start")
    assert isinstance(found, Outcome) and found.code == Ocf.ERR_CONFIGURED
    assert word in found.message


def test_actions() -> None:
    assert ocf.action_known("monitor") is None and ocf.action_known("usage") is None
    none = ocf.action_known(None)
    assert none is not None and none.code == Ocf.ERR_ARGS and "usage:" in none.message
    promote = ocf.action_known("promote")
    assert promote is not None and promote.code == Ocf.ERR_UNIMPLEMENTED


@pytest.mark.parametrize("svc, sub, scope, code", [
    ("active", "running", "active", Ocf.SUCCESS),
    ("reloading", "reload", "active", Ocf.SUCCESS),
    # systemd restarts the supervisor alone: the guest runs on
    ("activating", "auto-restart", "active", Ocf.SUCCESS),
    ("inactive", "dead", "inactive", Ocf.NOT_RUNNING),
    ("failed", "failed", "inactive", Ocf.NOT_RUNNING),
    ("failed", "failed", "failed", Ocf.NOT_RUNNING),
    # QEMU without its supervisor: not stopped, Pacemaker must stop it first
    ("failed", "failed", "active", Ocf.ERR_GENERIC),
    ("inactive", "dead", "active", Ocf.ERR_GENERIC),
    ("deactivating", "stop-sigterm", "active", Ocf.ERR_GENERIC),
    ("active", "running", "inactive", Ocf.ERR_GENERIC),
    ("activating", "auto-restart", "inactive", Ocf.ERR_GENERIC),
])
def test_monitor(svc: str, sub: str, scope: str, code: Ocf) -> None:
    assert ocf.monitor("web1", unit(svc, scope, sub)).code == code


@pytest.mark.parametrize("sub, result, restart, code", [
    # the supervisor killed: its ExecStopPost= runs, then systemd restarts it
    ("stop-post", "signal", "on-abnormal", Ocf.SUCCESS),
    ("stop-post", "signal", "on-failure", Ocf.SUCCESS),
    ("stop-sigterm", "core-dump", "on-abnormal", Ocf.SUCCESS),
    ("stop-post", "watchdog", "on-abnormal", Ocf.SUCCESS),
    # not restarted: an exit status under on-abnormal, any end under no
    ("stop-post", "exit-code", "on-abnormal", Ocf.ERR_GENERIC),
    ("stop-post", "signal", "no", Ocf.ERR_GENERIC),
    # an admin's stop (Result success): stopping, not running
    ("stop-sigterm", "success", "on-abnormal", Ocf.ERR_GENERIC),
    ("stop-post", "success", "on-failure", Ocf.ERR_GENERIC),
])
def test_monitor_while_systemd_restarts_the_supervisor(sub: str, result: str, restart: str,
                                                       code: Ocf) -> None:
    """Measured in a test host: a SIGKILL of the supervisor gave ~80 ms of
    deactivating/stop-post (Result=signal, the QEMU scope active) before
    activating/start; a monitor then must not call the running guest failed."""
    facts = UnitFacts("deactivating", sub, "active", "disabled", result, restart)
    assert ocf.monitor("web1", facts).code == code
    assert ocf.monitor("web1", facts._replace(scope_state="inactive")).code == Ocf.ERR_GENERIC


def test_validate_needs_root_for_what_changes_things() -> None:
    for action in ("start", "stop", "migrate_to", "migrate_from"):
        found = ocf.validate(action, params(action), GOOD, STOPPED, root=False)
        assert found is not None and found.code == Ocf.ERR_PERM
    for action in ("monitor", "validate-all"):
        assert ocf.validate(action, params(action), GOOD, STOPPED, root=False) is None


def test_a_missing_guest_file() -> None:
    """As ocf_rarun: a probe finds it not running, a stop has nothing to do,
    anything else is not installed."""
    probe = params("monitor", OCF_RESKEY_CRM_meta_interval="0")
    assert ocf.validate("monitor", probe, MISSING, STOPPED, True).code == Ocf.NOT_RUNNING  \
        # type: ignore[union-attr]
    found = ocf.validate("stop", params("stop"), MISSING, STOPPED, True)
    assert found is not None and found.code == Ocf.SUCCESS
    for action in ("start", "monitor", "validate-all", "migrate_to", "migrate_from"):
        found = ocf.validate(action, params(action), MISSING, STOPPED, True)
        assert found is not None and found.code == Ocf.ERR_INSTALLED, action
        assert "web1.toml does not exist on this node" in found.message


def test_a_guest_file_that_does_not_validate() -> None:
    for action in ("start", "validate-all", "migrate_to", "migrate_from"):
        found = ocf.validate(action, params(action), BROKEN, STOPPED, True)
        assert found is not None and found.code == Ocf.ERR_CONFIGURED
        assert "memory = '1X'" in found.message
    # a running guest is watched and stopped all the same
    assert ocf.validate("monitor", params(), BROKEN, RUNNING, True) is None
    assert ocf.validate("stop", params("stop"), BROKEN, RUNNING, True) is None


@pytest.mark.parametrize("enabled", ["enabled", "enabled-runtime", "linked"])
def test_a_guest_enabled_at_boot_is_not_configured(enabled: str) -> None:
    found = ocf.validate("validate-all", params("validate-all"), GOOD,
                         unit("inactive", "inactive", "dead", enabled), True)
    assert found is not None and found.code == Ocf.ERR_CONFIGURED
    assert "systemctl disable kvm@web1.service" in found.message
    found = ocf.validate("start", params("start"), GOOD, unit(enabled=enabled), True)
    assert found is not None and found.code == Ocf.ERR_CONFIGURED
    assert ocf.validate("monitor", params(), GOOD, unit(enabled=enabled), True) is None


def test_validate_passes() -> None:
    for enabled in ("disabled", "static", "", "indirect"):
        for action in ("start", "validate-all", "migrate_from"):
            assert ocf.validate(action, params(action), GOOD, unit(enabled=enabled),
                                True) is None


def test_migrate_to_without_a_target() -> None:
    found = ocf.validate("migrate_to", params("migrate_to"), GOOD, RUNNING, True)
    assert found is not None and found.code == Ocf.ERR_ARGS


def test_start_and_stop_judged_by_what_runs_afterwards() -> None:
    assert ocf.after_start("web1", 0, RUNNING).code == Ocf.SUCCESS
    failed = ocf.after_start("web1", 1, unit("failed", "inactive", "failed"))
    assert failed.code == Ocf.ERR_GENERIC and "journalctl -u kvm@web1.service" in failed.message
    assert ocf.after_stop("web1", 0, STOPPED).code == Ocf.SUCCESS
    # a guest that ended failed is stopped all the same
    assert ocf.after_stop("web1", 0, unit("failed", "inactive", "failed")).code == Ocf.SUCCESS
    # still there: a stop failure (Pacemaker fences the node, or blocks)
    assert ocf.after_stop("web1", 1, unit("deactivating", "active", "stop-sigterm")).code \
        == Ocf.ERR_GENERIC


@pytest.mark.parametrize("rc", [1, 2, 5, 6, 7, 8, 255])
def test_a_failed_move_is_a_generic_error(rc: int) -> None:
    """Never ERR_CONFIGURED or ERR_INSTALLED, which would ban the guest from
    every node: kvmagent migrate left it running here."""
    p = params("migrate_to", OCF_RESKEY_CRM_meta_migrate_target="node2")
    found = ocf.after_migrate_to(p, rc, "kvmagent: no bridge br0 on node2\n")
    assert found.code == Ocf.ERR_GENERIC and f"exit {rc}" in found.message
    assert "no bridge br0" in found.message
    assert ocf.after_migrate_to(p, 0, "").code == Ocf.SUCCESS


def test_migrate_from() -> None:
    assert ocf.after_migrate_from("web1", "node1", RUNNING, False).code == Ocf.SUCCESS
    waiting = ocf.after_migrate_from("web1", "node1", RUNNING, True)
    assert waiting.code == Ocf.ERR_GENERIC and "waiting for the migration stream" \
        in waiting.message
    assert ocf.after_migrate_from("web1", "node1", STOPPED, False).code == Ocf.ERR_GENERIC


def test_meta_data_is_valid_xml_with_what_pacemaker_reads() -> None:
    text = ocf.meta_data()
    assert text.startswith('<?xml version="1.0"?>\n<!DOCTYPE resource-agent SYSTEM')
    root = ET.fromstring(text)
    assert root.tag == "resource-agent" and root.get("name") == "guest"
    assert root.findtext("shortdesc") and root.findtext("longdesc")
    params_ = {p.get("name"): p for p in root.iter("parameter")}
    assert set(params_) == {"name", "migration_user", "migration_network_suffix"}
    assert params_["name"].get("required") == "1" and params_["name"].get("unique") == "1"
    for p in params_.values():
        assert p.findtext("shortdesc") and p.findtext("longdesc")
        content = p.find("content")
        assert content is not None and content.get("type") == "string"
    actions = {a.get("name"): a for a in root.iter("action")}
    assert set(actions) == set(ocf.ACTIONS)
    assert actions["monitor"].get("interval") == "10s"
    # stop outlasts the guest's stop timeout (kvmagent.toml's stop_timeout, 90 s by default)
    assert int(actions["stop"].get("timeout", "0s")[:-1]) > 90


def test_the_runner_without_systemd(capsys: pytest.CaptureFixture[str]) -> None:
    assert runner.main([], {}) == Ocf.ERR_ARGS
    assert "usage: guest {start|stop|monitor" in capsys.readouterr().err
    assert runner.main(["promote"], ENV) == Ocf.ERR_UNIMPLEMENTED
    assert capsys.readouterr().err.startswith("ocf-exit-reason:action 'promote'")
    assert runner.main(["start"], {}) == Ocf.ERR_CONFIGURED
    assert "ocf-exit-reason:parameter name is required" in capsys.readouterr().err
    assert runner.main(["meta-data"], {}) == Ocf.SUCCESS
    assert ET.fromstring(capsys.readouterr().out).get("name") == "guest"
    assert runner.main(["usage"], {}) == Ocf.SUCCESS
    assert "usage:" in capsys.readouterr().out


def test_the_installed_agent_is_the_runner() -> None:
    """/usr/lib/ocf/resource.d/kvmagent/guest: Debian's python3 running
    kvmagent.cli.ocf (tests/system/test_package.py: the package has it there,
    mode 0755; a copy of the checkout need not keep the mode)."""
    script = REPO / "ocf" / "guest"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/python3\n") and "from kvmagent.cli.ocf import main" in text


def test_the_docs_name_what_the_agent_has() -> None:
    """docs/pacemaker.md names every action (its table) and parameter;
    README's "More than one host" and kvm@.service(8) the agent's path and
    its one required parameter."""
    guide = (REPO / "docs" / "pacemaker.md").read_text()
    rows = re.findall(r"^\| ([a-z_-]+) \|", guide, re.M)
    assert rows[0] == "action" and sorted(rows[1:]) == sorted(ocf.ACTIONS), rows
    for name, *_ in ocf.PARAMETERS:
        assert f"`{name}`" in guide, name
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## More than one host\n"):]
    section = section[:section.index("\n## ")]
    manual = (REPO / "docs" / "kvm@.service.8.md").read_text()
    for text in (section, manual, guide):
        assert "/usr/lib/ocf/resource.d/kvmagent/guest" in text and ocf.AGENT in text
    assert "params name=arkani" in section and "pacemaker.md" in section


CIB = """<cib crm_feature_set="3.16.2" validate-with="pacemaker-3.9" epoch="7">
  <configuration>
    <crm_config/>
    <nodes/>
    <resources>
      <primitive id="ha" class="ocf" provider="kvmagent" type="guest">
        <instance_attributes id="ha-instance_attributes">
          <nvpair name="name" value="ha" id="ha-instance_attributes-name"/>
        </instance_attributes>
        <meta_attributes id="ha-meta_attributes">
          <nvpair name="allow-migrate" value="true" id="ha-meta_attributes-allow-migrate"/>
        </meta_attributes>
      </primitive>
      <group id="g">
        <primitive id="web" class="ocf" provider="kvmagent" type="guest">
          <instance_attributes id="web-ia"><nvpair name="name" value="web1" id="w"/>
          </instance_attributes>
        </primitive>
      </group>
      <primitive id="vd" class="ocf" provider="heartbeat" type="VirtualDomain">
        <instance_attributes id="vd-ia"><nvpair name="name" value="other" id="v"/>
        </instance_attributes>
      </primitive>
    </resources>
  </configuration>
</cib>"""


def test_the_guests_a_cib_runs() -> None:
    assert ocf.cib_guests(CIB) == {"ha", "web1"}
    assert ocf.cib_guests("<cib><configuration>") == set()  # cut short: nothing


def test_validate_host_warns_of_an_enabled_guest_pacemaker_runs(tmp_path: Path) -> None:
    warning = ocf.enabled_under_pacemaker("ha", "enabled")
    assert warning is not None and "systemctl disable kvm@ha.service" in warning
    assert ocf.enabled_under_pacemaker("ha", "disabled") is None
    # a guest no CIB names: systemd is not even asked
    from kvmagent.cli.commands import pacemaker_enabled
    cib = tmp_path / "cib.xml"
    assert pacemaker_enabled("ha", cib) == []
    cib.write_text(CIB)
    assert pacemaker_enabled("other", cib) == []


def test_who_restarts_what_under_pacemaker() -> None:
    """The agent's runtime drop-in: systemd restarts a supervisor killed by a
    signal or its watchdog (its successor takes the guest over), not a unit
    whose QEMU died (the supervisor's exit status 1): Pacemaker does."""
    path, text = ocf.pacemaker_dropin("web1")
    assert path == "/run/systemd/system/kvm@web1.service.d/50-pacemaker.conf"
    assert "[Service]\nRestart=on-abnormal\n" in text
    unit = (REPO / "units" / "kvm@.service").read_text()
    assert "\nRestart=on-failure\n" in unit  # what the drop-in narrows, without Pacemaker


def test_shutdown_stops_pacemaker_first() -> None:
    """At the node's shutdown kvm@NAME stops after pacemaker.service (and
    pacemaker_remote.service), as Pacemaker's own systemd: resources do:
    Pacemaker moves the guest away first."""
    _, text = ocf.pacemaker_dropin("web1")
    assert "[Unit]\nBefore=pacemaker.service pacemaker_remote.service\n" in text


JOBS = """\
   812 kvm@web1.service          stop    waiting
   799 pacemaker.service         stop    running
"""


def test_a_waiting_stop_job_is_found() -> None:
    assert ocf.stop_waiting(JOBS, "kvm@web1.service")
    assert not ocf.stop_waiting(JOBS, "kvm@web2.service")
    assert not ocf.stop_waiting(JOBS, "pacemaker.service")  # running, not waiting
    assert not ocf.stop_waiting("   9 kvm@web1.service start waiting\n", "kvm@web1.service")
    assert not ocf.stop_waiting("", "kvm@web1.service")
    assert not ocf.stop_waiting("No jobs running.\n", "kvm@web1.service")


def test_stop_never_waits_on_a_job_queued_behind_pacemaker() -> None:
    """Stopped units get no job at all (after migrate_to the source's
    supervisor has ended by itself); a running one with a stop job waiting
    is stopped through its supervisor; otherwise systemctl stop."""
    W = ocf.StopWay
    assert ocf.stop_way(STOPPED, False) is W.NOTHING
    assert ocf.stop_way(STOPPED, True) is W.NOTHING
    assert ocf.stop_way(unit("failed", "inactive", "failed"), True) is W.NOTHING
    assert ocf.stop_way(unit("inactive", "active", "dead"), True) is W.NOTHING  # its scope: later
    assert ocf.stop_way(RUNNING, False) is W.SYSTEMCTL
    assert ocf.stop_way(RUNNING, True) is W.SUPERVISOR
    assert ocf.stop_way(unit("reloading"), True) is W.SUPERVISOR
    assert ocf.stop_way(unit("deactivating", sub="stop-sigterm"), False) is W.SYSTEMCTL
