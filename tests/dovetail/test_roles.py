"""Roles and liveness settings that are refused before anything starts (no processes here)."""
import pytest

import dovetail
from dovetail.cli import build_parser, check_role_flags, main
from dovetail.runtime.config import CoordinatorConfig
from dovetail.runtime.launch import check_remote
from dovetail.workers.lifeline import SilenceClock, check_heartbeat_timeout

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("bad", [{"heartbeat_interval_s": 0}, {"heartbeat_interval_s": -1},
                                 {"heartbeat_interval_s": 3600}, {"heartbeat_liveness": 0},
                                 {"heartbeat_liveness": 2.5}, {"connect_timeout_s": 0}])
def test_bad_liveness_settings_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        CoordinatorConfig(**bad)


def test_liveness_window_is_interval_times_count():
    assert CoordinatorConfig(heartbeat_interval_s=0.25, heartbeat_liveness=4).liveness_window_s == 1.0


def test_worker_heartbeat_timeout_must_not_be_negative():
    check_heartbeat_timeout(0.0)
    with pytest.raises(ValueError, match="heartbeat-timeout"):
        check_heartbeat_timeout(-1.0)


def test_silence_clock_starts_at_the_first_message():
    clock = SilenceClock(0.01)
    assert not clock.expired()  # nobody has spoken yet: wait for the first coordinator
    clock.heard()
    assert not clock.expired()
    clock.last -= 1.0
    assert clock.expired()
    assert not SilenceClock(0.0).expired()


@pytest.mark.parametrize("argv, message", [
    (["--role", "target"], "--listen"),
    (["--listen", "tcp://10.0.0.1:5555"], "--listen"),
    (["--role", "draft"], "--connect"),
    (["--connect", "tcp://10.0.0.1:5555"], "--connect"),
    (["--role", "draft", "--connect", "tcp://h:1", "--curve-secret", "x", "--curve-allow", "y"], "--role target"),
    (["--role", "target", "--listen", "tcp://h:1", "--curve-client-secret", "x", "--curve-server-public", "y"],
     "--role draft"),
    (["--role", "draft", "--connect", "tcp://h:1", "--curve-client-secret", "x"], "go together"),
    (["--role", "draft", "--connect", "tcp://h:1", "--target-cpus", "0-3"], "--target-cpus"),
    (["--prefill-chunk", "513"], "--prefill-chunk must be in 0..512"),
    (["--prefill-chunk", "-1"], "--prefill-chunk"),
    (["--prefill-timeout", "0"], "--prefill-timeout must be > 0"),
    (["--verify-timeout", "-5"], "--verify-timeout must be > 0"),
])
def test_role_flags_for_the_other_host_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        check_role_flags(build_parser().parse_args(argv))


def test_target_role_off_loopback_without_keys_is_refused(capsys):
    assert main(["--role", "target", "--listen", "tcp://0.0.0.0:5555"]) == 1
    assert "dovetail-launch keys" in capsys.readouterr().err


def test_remote_target_off_loopback_needs_client_keys():
    with pytest.raises(ValueError, match="client_keys"):
        check_remote("tcp://10.1.2.3:5555", None, None)
    with pytest.raises(ValueError, match="tcp://"):
        check_remote("ipc:///tmp/x", None, None)
    with pytest.raises(ValueError, match="target_cpus"):
        check_remote("tcp://127.0.0.1:5555", None, "0-3")
    check_remote("tcp://127.0.0.1:5555", None, None)  # loopback: plain is allowed


def test_launch_needs_a_target_or_an_address():
    with pytest.raises(ValueError, match="target_address"):
        dovetail.launch(None)
