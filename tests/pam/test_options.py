"""pam_callerid.options: pam_slurm_adopt's option names, values, defaults and matching."""
import pytest
from hypothesis import given, strategies as st

from pam_callerid import options
from pam_callerid.options import parse


def test_defaults_match_pam_slurm_adopt():
    o = parse([])
    assert o.action_no_jobs == "deny"
    assert o.action_unknown == "newest"
    assert o.action_adopt_failure == "allow"
    assert o.action_generic_failure == "ignore"
    assert o.disable_x11 is False
    assert o.ignore_root is True
    assert o.join_container is True
    assert o.log_level == options.LOG_LEVELS["info"]
    assert o.nodename is None
    assert o.service == "sshd"
    assert o.single_job_skip_rpc is True
    # ours
    assert 0 < o.rpc_timeout <= 1.0
    assert o.port is None
    assert o.config == "/etc/slurm/callerid.conf"
    assert o.audit == options.DEFAULT_AUDIT
    assert o.messages == "fallback"
    assert o.allow_groups == ()
    assert o.socket == "/run/callerid/pam.sock" and o.daemon_timeout == 2.0
    assert o.logs == ()


@pytest.mark.parametrize("name,values", [
    ("action_no_jobs", ["deny", "ignore"]),
    ("action_unknown", ["newest", "allow", "deny", "user"]),
    ("action_adopt_failure", ["allow", "deny"]),
    ("action_generic_failure", ["ignore", "allow", "deny"]),
    ("messages", ["fallback", "always", "never"]),
])
def test_every_action_value(name, values):
    for v in values:
        for spelled in (v, v.upper(), v.capitalize(), v + "XYZ"):
            o = parse(["%s=%s" % (name, spelled)])
            assert getattr(o, name) == v, spelled
            assert o.logs == ()
        # option name is matched case-insensitively
        o = parse(["%s=%s" % (name.upper(), v)])
        assert getattr(o, name) == v


@pytest.mark.parametrize("name,safest", [
    ("action_no_jobs", "deny"), ("action_unknown", "deny"),
    ("action_adopt_failure", "deny"), ("action_generic_failure", "deny"),
    ("messages", "fallback")])
@pytest.mark.parametrize("bad", ["", "dny", "alow", "xnewest", "0", "yes"])
def test_bad_action_value_picks_safest_and_logs(name, safest, bad):
    o = parse(["%s=%s" % (name, bad)])
    assert getattr(o, name) == safest
    assert any("unrecognized %s=" % name in t for _, t in o.logs)


@pytest.mark.parametrize("name", ["disable_x11", "ignore_root", "join_container",
                                  "single_job_skip_rpc"])
def test_booleans(name):
    for word, val in (("1", True), ("0", False), ("true", True), ("false", False),
                      ("TRUE", True), ("False", False)):
        o = parse(["%s=%s" % (name, word)])
        expect = True if name == "ignore_root" else val   # ignore_root=0 is forced back to 1
        assert getattr(o, name) is expect


def test_bad_boolean_keeps_default():
    o = parse(["single_job_skip_rpc=maybe", "disable_x11=perhaps"])
    assert o.single_job_skip_rpc is True and o.disable_x11 is False
    assert len([t for lv, t in o.logs if "unrecognized" in t]) == 2


def test_ignore_root_zero_is_forced_to_one_with_danger_log():
    o = parse(["ignore_root=0"])
    assert o.ignore_root is True
    assert any("Danger" in t for _, t in o.logs)


def test_bare_quiet_means_messages_never():
    assert parse(["quiet"]).messages == "never"
    assert parse(["QUIET"]).messages == "never"
    assert parse(["quiet", "messages=always"]).messages == "always"      # last one wins


def test_allow_groups():
    assert parse(["allow_groups=wheel, hpcadmin,,"]).allow_groups == ("wheel", "hpcadmin")
    o = parse(["allow_groups="])
    assert o.allow_groups == () and o.logs


def test_client_options_accepted():
    o = parse(["socket=/run/x/pam.sock", "daemon_timeout=0.5"])
    assert (o.socket, o.daemon_timeout, o.logs) == ("/run/x/pam.sock", 0.5, ())
    o = parse(["socket=relative", "daemon_timeout=99"])
    assert o.socket == "/run/callerid/pam.sock" and o.daemon_timeout == 60.0
    assert len(o.logs) == 2


def test_log_levels():
    for name, num in options.LOG_LEVELS.items():
        assert parse(["log_level=" + name]).log_level == num
        assert parse(["log_level=" + name.upper()]).log_level == num
    assert parse(["log_level=7"]).log_level == 7
    assert parse(["log_level=99"]).log_level == 9
    o = parse(["log_level=loud"])
    assert o.log_level == options.LOG_LEVELS["info"] and o.logs


def test_strings():
    o = parse(["nodename=node7", "service=login", "config=/x/y.conf", "audit=/var/a.jsonl"])
    assert (o.nodename, o.service, o.config, o.audit) == ("node7", "login", "/x/y.conf",
                                                          "/var/a.jsonl")
    assert parse(["service=*"]).service == "*"
    assert parse(["audit=none"]).audit == "none"
    o = parse(["config=relative.conf", "audit=rel"])
    assert o.config == options.DEFAULT_CONFIG and o.audit == options.DEFAULT_AUDIT
    assert len(o.logs) == 2
    o = parse(["service="])
    assert o.service == "sshd" and o.logs


def test_rpc_timeout_and_port():
    assert parse(["rpc_timeout=0.3"]).rpc_timeout == 0.3
    o = parse(["rpc_timeout=100"])
    assert o.rpc_timeout == options.RPC_TIMEOUT_MAX and o.logs
    o = parse(["rpc_timeout=0"])
    assert o.rpc_timeout == options.RPC_TIMEOUT_MIN and o.logs
    for bad in ("abc", "nan", ""):
        o = parse(["rpc_timeout=" + bad])
        assert o.rpc_timeout == options.RPC_TIMEOUT_DEFAULT and o.logs
    assert parse(["port=7000"]).port == 7000
    for bad in ("0", "70000", "x", "-1"):
        o = parse(["port=" + bad])
        assert o.port is None and o.logs


def test_unknown_options_logged_and_ignored():
    o = parse(["frobnicate=1", "action_unknow=deny", "debug", "rpc_timeout"])
    assert o.action_unknown == "newest"
    assert len(o.logs) == 4
    assert all("ignoring unrecognized option" in t for _, t in o.logs)


def test_last_one_wins():
    assert parse(["action_unknown=deny", "action_unknown=allow"]).action_unknown == "allow"


_SAFETY = {"action_no_jobs": ["deny", "ignore"], "action_unknown": ["deny", "user", "newest",
           "allow"], "action_adopt_failure": ["deny", "allow"],
           "action_generic_failure": ["deny", "ignore", "allow"]}


@given(st.lists(st.text(max_size=40), max_size=8))
def test_parse_never_raises(args):
    o = parse(args)
    assert o.service and o.ignore_root is True
    assert 0 < o.rpc_timeout <= options.RPC_TIMEOUT_MAX


@given(st.sampled_from(sorted(_SAFETY)), st.text(max_size=12))
def test_value_is_either_recognised_or_safest(name, value):
    o = parse(["%s=%s" % (name, value)])
    got = getattr(o, name)
    if not any(value.lower().startswith(v) for v in _SAFETY[name]):
        assert got == "deny"
    else:
        assert value.lower().startswith(got)
