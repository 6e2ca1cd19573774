"""The operating parts' pure logic (no root, no pair): the TOML config and
drb up's parser, the log2 histograms as Prometheus buckets, the metric
families, the OCI hook's reading of a container's state, the hooks.d entry,
the event log's rotation and its reader, the daemon's monotonic totals."""
import io
import json
import os

import pytest

from drb_uring.domains import journal
from drb_uring.domains.config import PairConfig
from drb_uring.domains.stats import RING_WRAP, PairStats
from drb_uring.ops import events, hook, install, metrics, tomlconfig
from drb_uring.tools import cli

PARSER = cli.build_parser()
UP = cli._up_parser(PARSER)


def _config_of(argv):
    return cli._config(PARSER.parse_args(argv))


def _via_file(tmp_path, cfg: PairConfig, extra=()):
    path = tmp_path / "pair.toml"
    path.write_text(tomlconfig.to_toml(cfg.to_dict()))
    argv = ["up", cfg.name, "--config", str(path), *extra]
    a = PARSER.parse_args(argv)
    return cli._config(tomlconfig.expand(argv, a.config, a.name, PARSER, UP))


@pytest.mark.parametrize("cfg", [
    PairConfig(name="db"),
    PairConfig(name="web", size=1 << 30, users=4, extent=128 << 20, max_users=8,
               max_channels=7, max_pinned=3 << 20, domain_pids=100, domain_memory=5 << 30,
               driver_cpus=0, deny=[], share=["/srv/a:/app", "/srv/b:/data"], restart=True,
               no_monitor=True, o_direct=True),
    PairConfig(name="att", backing="/var/lib/x.img", attach_user=1234, attach_driver=5678,
               allow_host_userns=True, force=True, deny=["inet"]),
    PairConfig(name="blk", blockdev="/dev/loop7", user_rootfs="/srv/u", driver_rootfs="/srv/d"),
])
def test_config_file_round_trip(tmp_path, cfg):
    cli_cfg = _config_of(["up", cfg.name])     # what the CLI makes of no option at all
    want = {**cli_cfg.to_dict(), **{f: v for f, v in cfg.to_dict().items()
                                    if f in tomlconfig.FIELDS}}
    assert _via_file(tmp_path, cfg).to_dict() == want


def test_command_line_wins_over_the_file(tmp_path):
    cfg = PairConfig(name="db", max_channels=5, users=2, share=["/a:/app"])
    got = _via_file(tmp_path, cfg, ["--max-channels", "9", "--share", "/b:/data"])
    assert got.max_channels == 9 and got.users == 2
    assert got.share == ["/a:/app", "/b:/data"]        # repeatable: both


def test_every_option_of_up_is_a_key():
    keys = set(tomlconfig.up_options(UP))
    assert {f.replace("_", "-") for f in tomlconfig.FIELDS} | {"foreground"} == keys


@pytest.mark.parametrize("text, says", [
    ('sise = "1g"\n', "'sise' is no option of drb up"),
    ('o-direct = "yes"\n', "o-direct: true or false"),
    ('max-channels = "many"\n', "max-channels: not an integer"),
    ('users = 0\n', "users: must be a positive integer"),
    ('size = "1x"\n', "size: not a size"),
    ('users = 1.5\n', "users: a string or an integer"),
    ('name = "other"\n', "the configuration of another pair"),
    ('size = \n', "not TOML"),
])
def test_config_file_mistakes_name_the_file_and_key(tmp_path, text, says):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(tomlconfig.ConfigFileError) as e:
        tomlconfig.file_argv(str(path), "db", UP)
    assert says in str(e.value) and "bad.toml" in str(e.value)


def test_config_file_conflicts_are_the_parsers(tmp_path, capsys):
    path = tmp_path / "p.toml"
    path.write_text('backing = "/x.img"\nblockdev = "/dev/loop0"\n')
    with pytest.raises(SystemExit):
        tomlconfig.expand(["up", "db", "--config", str(path)], str(path), "db", PARSER, UP)
    assert "not allowed with argument" in capsys.readouterr().err


def test_sizes_written_as_people_write_them():
    assert [tomlconfig.size_text(n) for n in (1 << 20, 3 << 30, 4096 * 3, 1000)] == \
        ["1m", "3g", "12k", "1000"]


# ---- metrics ---------------------------------------------------------------------------

def test_log2_buckets_as_prometheus_buckets():
    # bpftrace's numbering: 1 holds 0 us, 2 holds [1, 2), k holds [2^(k-2), 2^(k-1)).
    assert metrics.le_of(1) == 1e-6 and metrics.le_of(2) == 2e-6 and metrics.le_of(5) == 16e-6
    buckets, total = metrics.histogram({"1": 2, "3": 5, "6": 1, "40": 1})
    les = dict(buckets)
    assert les[repr(1e-6)] == 2 and les[repr(2e-6)] == 2 and les[repr(4e-6)] == 7
    assert les[repr(32e-6)] == 8 and les[repr(metrics.le_of(metrics.TOP_BUCKET))] == 8
    assert buckets[-1] == ("+Inf", 9)
    assert [b for _, b in buckets] == sorted(b for _, b in buckets)
    assert total == pytest.approx((5 * 3 + 1 * 24 + 1.5 * 2 ** 38) / 1e6)


SNAP = {
    "pair": "db", "monitor": True, "monitor_deaths": 1, "monitor_restarts": 1,
    "user_names": ["user0"],
    "users": {"user0": {"ring_requests": 10, "requests": {"read": 7, "write": 2, "flush": 1},
                        "bytes": {"read": 7 * 4096, "write": 8192}, "channels": 2,
                        "channels_opened": 3, "pinned_bytes": 1 << 20, "max_channels": 64,
                        "max_pinned": 512 << 20, "violations": {"opcode": 1},
                        "worker_deaths": 2, "worker_restarts": 1,
                        "latency_us_log2": {"submit_to_complete": {"4": 10}}}},
    "domains": {"driver": {"syscalls": 5, "ctx_switches": 1, "ios": 10},
                "user0": {"syscalls": 0, "ctx_switches": 0, "ios": 10}}}


def test_metric_families_of_a_snapshot():
    from prometheus_client import CollectorRegistry, generate_latest

    class One:
        def collect(self):
            return metrics.families({"db": SNAP, "gone": None})
    reg = CollectorRegistry(auto_describe=False)
    reg.register(One())
    text = generate_latest(reg).decode()
    for line in ['drb_pair_up{pair="db"} 1.0', 'drb_pair_up{pair="gone"} 0.0',
                 'drb_ring_requests_total{pair="db",user="user0"} 10.0',
                 'drb_requests_total{op="read",pair="db",user="user0"} 7.0',
                 'drb_bytes_total{op="write",pair="db",user="user0"} 8192.0',
                 'drb_violations_total{pair="db",reason="opcode",user="user0"} 1.0',
                 'drb_stage_latency_seconds_bucket{le="+Inf",pair="db",stage="submit_to_'
                 'complete",user="user0"} 10.0',
                 'drb_stage_latency_seconds_count{pair="db",stage="submit_to_complete",'
                 'user="user0"} 10.0',
                 'drb_domain_ios_total{domain="driver",pair="db"} 10.0',
                 'drb_worker_restarts_total{pair="db",user="user0"} 1.0',
                 'drb_monitor_restarts_total{pair="db"} 1.0']:
        assert line in text, line


@pytest.mark.parametrize("text, want", [("9478", ("127.0.0.1", 9478)),
                                        ("0.0.0.0:80", ("0.0.0.0", 80)),
                                        ("[::1]:9478", ("::1", 9478))])
def test_listen_addresses(text, want):
    assert metrics.parse_listen(text) == want


def test_bad_listen_address():
    with pytest.raises(metrics.MetricsError):
        metrics.parse_listen("localhost:http")


class _Tenant:
    def __init__(self, name):
        self.name = name


class _Chan:
    def __init__(self, cid, user, head):
        self.id, self.tenant, self.head, self.gid, self.ended = cid, _Tenant(user), head, 0, False

    def request_head(self):
        return self.head


class _Broker:
    class link:
        enforcer = None
        enforce = False
        domains = {}

    def __init__(self):
        self.channels = {}

    def tenant_info(self):
        users = {ch.tenant.name for ch in self.channels.values()} | {"user0"}
        return {u: {"channels": 0, "pinned": 0, "limits": {"channels": 64, "pinned": 1}}
                for u in users}


def test_totals_stay_monotonic_across_wraps_restarts_and_channel_ends():
    b = _Broker()
    s = PairStats("db", lambda: b)
    ch = b.channels[1] = _Chan(1, "user0", RING_WRAP - 5)
    s.on_event("channel-opened", {"user": "user0", "channel": 1})
    ch.head = 10                                   # wrapped: 15 more
    assert s.snapshot()["users"]["user0"]["ring_requests"] == 15
    ch.head = 30
    s.on_event("channel-closed", {"user": "user0", "channel": 1})   # its last count taken
    del b.channels[1]
    assert s.snapshot()["users"]["user0"]["ring_requests"] == 35
    b.channels[2] = _Chan(2, "user0", 0)
    s.on_event("channel-opened", {"user": "user0", "channel": 2})
    b.channels[2].head = 4
    for ev in ("worker-died", "worker-restarted", "worker-died"):
        s.on_event(ev, {"user": "user0"})
    s.on_event("violation", {"user": "user0", "channel": 2, "reason": "opcode"})
    u = s.snapshot()["users"]["user0"]
    assert (u["ring_requests"], u["worker_deaths"], u["worker_restarts"],
            u["violations"]) == (39, 2, 1, {"opcode": 1})
    assert s._grow(("x",), 100) == 100 and s._grow(("x",), 40) == 40   # a source restarted
    whole = s.snapshot(users=None)
    assert whole["monitor"] is False and whole["domains"]["driver"]["ios"] == 0
    assert "requests" not in whole["users"]["user0"] and whole["counted"] == ["ring"]


# ---- the OCI hook ------------------------------------------------------------------------

@pytest.mark.parametrize("ann, says", [
    ({}, "no io.drb.pair annotation"),
    ({"io.drb.pair": "Bad!"}, "io.drb.pair=Bad!: bad pair name"),
    ({"io.drb.pair": "db", "io.drb.disk": "yes"}, "io.drb.disk=yes"),
    ({"io.drb.pair": "db", "io.drb.pairs": "x"}, "unknown annotation io.drb.pairs"),
])
def test_bad_annotations(ann, says):
    with pytest.raises(hook.HookError) as e:
        hook.wanted(ann)
    assert says in str(e.value)


def test_annotations():
    assert hook.wanted({"io.drb.pair": "db", "other": "x"}) == ("db", False)
    assert hook.wanted({"io.drb.pair": "db", "io.drb.disk": "1"}) == ("db", True)


def test_container_root_from_its_bundle(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"root": {"path": "rootfs"}}))
    assert hook.from_bundle(str(tmp_path)) == (str(tmp_path / "rootfs"), None)
    (tmp_path / "config.json").write_text(json.dumps({"root": {"path": "/srv/r/"},
                                                      "hostname": "c1"}))
    assert hook.from_bundle(str(tmp_path)) == ("/srv/r", "c1")


@pytest.mark.parametrize("text", ["", "[]", '{"status": "creating"}', "{"])
def test_state_that_is_not_a_containers(text):
    with pytest.raises(hook.HookError):
        hook.read_state(text)


def test_hook_config_matches_the_annotation_only():
    import re
    cfg = install.hook_config("/usr/bin/drb")
    assert cfg["version"] == "1.0.0" and cfg["stages"] == ["createRuntime", "poststop"]
    assert cfg["hook"]["path"] == "/usr/bin/drb" and cfg["hook"]["args"][1:] == ["hook"]
    (key, value), = cfg["when"]["annotations"].items()
    assert re.search(key, "io.drb.pair") and not re.search(key, "io.drb.pairs")
    assert not re.search(key, "ioXdrb.pair") and re.search(value, "db")


def test_unit_files_get_the_path_of_drb():
    for name in install.UNITS:
        text = install.unit_text(name, "/opt/drb/bin/drb")
        assert "@DRB@" not in text and "ExecStart=/opt/drb/bin/drb " in text
    assert "up %i --config /etc/drb/%i.toml --foreground" in install.unit_text(
        "drb@.service", "/x")


# ---- the event log -------------------------------------------------------------------------

def test_event_log_rotates_and_reads_back_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "LOG_DIR", str(tmp_path))
    monkeypatch.setattr(journal, "ROTATE_BYTES", 400)
    tail = events.Tail("db", from_start=True)
    for k in range(40):
        journal.record("db", "channel-opened", user="user0", channel=k)
        if k % 7 == 0:
            assert [json.loads(x)["channel"] for x in tail.lines()][-1] == k
    files = journal.rotated("db")
    assert len(files) == journal.KEEP + 1
    assert all(os.path.getsize(p) <= 400 for p in files)
    got = [ev["channel"] for ev in events.read(["db"])]
    assert got == sorted(got) and got[-1] == 39 and len(got) < 40     # the oldest went
    tail.close()


def test_event_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "LOG_DIR", str(tmp_path))
    journal.record("db", "violation", user="user1", channel=3, reason="opcode differs", pid=9)
    ev, = events.read(["db"])
    line = events.format_event(ev)
    assert line.split(" ", 1)[1] == \
        'db violation user=user1 channel=3 reason="opcode differs" pid=9'
    when = line.split(" ", 1)[0]
    assert when.startswith(events.when(ev["ts"])[:10]) and when[19] == "."
    out = json.loads(events.format_event(ev, as_json=True))
    assert out["time"] == when and out["reason"] == "opcode differs"
    buf = io.StringIO()
    monkeypatch.setattr(events, "require_root", lambda: None)
    assert events.run("db", False, False, buf) == 0 and buf.getvalue() == line + "\n"
    with pytest.raises(events.EventsError):
        events.run("nosuch", False, False, buf)
