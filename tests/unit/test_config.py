"""A pair's configuration and the specs that cross process boundaries
(pure logic, no root)."""
import dataclasses
import json

import pytest

from drb_uring.channel.worker import WorkerSpec
from drb_uring.domains.config import PairConfig, parse_size
from drb_uring.spec import Spec, SpecError


@pytest.mark.parametrize("text, n", [("4k", 4096), ("256m", 256 << 20), ("1G", 1 << 30),
                                     ("2t", 2 << 40), ("12345", 12345)])
def test_sizes(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["12q", "", "k", "-1m", "1.5g", "0"])
def test_bad_sizes_name_the_suffixes(text):
    with pytest.raises(SpecError, match="k, m, g or t|must be positive"):
        parse_size(text)


@pytest.mark.parametrize("kw, words", [
    ({"name": "Bad/Name"}, "bad pair name 'Bad/Name'"),
    ({"name": "ok", "size": 1000}, "too small"),
    ({"name": "ok", "attach_user": 5}, "go together"),
    ({"name": "ok", "deny": ["inet", "carrier-pigeon"]}, "unknown address family"),
    ({"name": "ok", "backing": "/a", "blockdev": "/b"}, "exclude each other"),
    ({"name": "ok", "attach_user": 1, "attach_driver": 7}, "cannot attach to pid 1"),
])
def test_pair_config_refuses(kw, words):
    with pytest.raises(SpecError, match=words):
        PairConfig(**kw)


def test_pair_config_round_trips_through_json():
    cfg = PairConfig(name="db", size=1 << 30, o_direct=True, deny=["inet"])
    assert PairConfig.from_json(cfg.to_json()) == cfg
    assert not cfg.attached


def test_spec_parser_trusts_nothing():
    good = PairConfig(name="db").to_dict()
    with pytest.raises(SpecError, match="unknown field"):
        PairConfig.from_dict({**good, "evil": 1})
    with pytest.raises(SpecError, match="expected <class 'int'>, got '1'"):
        PairConfig.from_dict({**good, "size": "1"})
    with pytest.raises(SpecError, match="expected <class 'bool'>"):
        PairConfig.from_dict({**good, "o_direct": 1})
    with pytest.raises(SpecError, match="missing"):
        PairConfig.from_dict({})
    with pytest.raises(SpecError, match="not JSON"):
        PairConfig.from_json("{")
    with pytest.raises(SpecError, match="expected an object"):
        PairConfig.from_json("[1]")


def test_worker_spec_never_carries_the_pool():
    chan = dict(id=1, ring_fd=30, params="00", pool_base=0, ring_fds=[31, 32, -1, 33, 34],
                extent_base=0, extent_size=4096, align=0)
    spec = dict(channels=[chan], ctl_fd=20, report_fd=21, gate_fd=-1, hold_fd=22, spin_ns=0)
    assert WorkerSpec.from_json(json.dumps(spec)).channel_specs()[0].ring_fds[2] == -1
    with pytest.raises(SpecError, match="never the pool"):
        WorkerSpec.from_dict({**spec, "channels": [{**chan, "ring_fds": [31, 32, 8, 33, 34]}]})


def test_worker_spec_places_its_fds_in_the_order_it_lists_them():
    chans = [dict(id=k, ring_fd=30 + 10 * k, params="00", pool_base=0,
                  ring_fds=[31 + 10 * k, 32 + 10 * k, -1, 33 + 10 * k, 34 + 10 * k],
                  extent_base=0, extent_size=4096, align=0) for k in range(2)]
    spec = WorkerSpec(channels=chans, ctl_fd=20, report_fd=21, gate_fd=23, hold_fd=22,
                      spin_ns=0)
    fds = spec.fds()
    assert fds == [20, 21, 23, 22, 30, 31, 32, 33, 34, 40, 41, 42, 43, 44]
    placed = spec.placed(3)
    # What the worker reads at 3, 4, ... is what the broker listed there.
    assert placed.fds() == list(range(3, 3 + len(fds)))
    assert [placed.ctl_fd, placed.report_fd, placed.gate_fd, placed.hold_fd] == [3, 4, 5, 6]
    first = spec.replace(gate_fd=-1).placed(3)
    assert first.gate_fd == -1 and first.fds() == list(range(3, 3 + len(fds) - 1))


def test_nested_types_are_checked():
    @dataclasses.dataclass(frozen=True)
    class S(Spec):
        xs: list[int]
        m: dict[str, int] | None = None
    assert S.from_dict({"xs": [1, 2], "m": {"a": 1}}).xs == [1, 2]
    with pytest.raises(SpecError):
        S.from_dict({"xs": [1, "2"]})
    with pytest.raises(SpecError):
        S.from_dict({"xs": [], "m": {"a": True}})


def test_bench_only_settings_are_checked():
    assert PairConfig(name="b", user_io_uring=True).user_io_uring
    with pytest.raises(SpecError, match="not attached containers"):
        PairConfig(name="b", user_io_uring=True, attach_user=5, attach_driver=6)
    assert PairConfig(name="b", worker_spin_ns=0).worker_spin_ns == 0
    with pytest.raises(SpecError, match="worker spin"):
        PairConfig(name="b", worker_spin_ns=-1)
    with pytest.raises(SpecError, match="worker spin"):
        PairConfig(name="b", worker_spin_ns=3_601 * 10**9)


def test_bench_cell_and_server_specs():
    from drb_uring.tools.baselines import ServerSpec
    from drb_uring.tools.benchcell import CellSpec
    base = dict(transport="drb", opcode=4, rand=True, bs=4096, qd=1, seconds=1.0,
                counted_seconds=0.2, extent=1 << 20, slot_count=1, slot_size=4096, entries=2)
    with pytest.raises(SpecError, match="needs the monitor's socket"):
        CellSpec.from_dict(base)
    assert CellSpec.from_dict({**base, "socket": "/run/x"}).qd == 1
    with pytest.raises(SpecError, match="transport"):
        CellSpec.from_dict({**base, "transport": "pigeon", "socket": "/x"})
    with pytest.raises(SpecError, match="no driver side"):
        ServerSpec(kind="direct", slot_count=1, slot_size=4096)
    with pytest.raises(SpecError, match="power of two"):
        ServerSpec(kind="grant-map", slot_count=1, slot_size=4096, entries=3)


# ---- many user domains on one driver domain -----------------------------------------

def test_users_and_extent_are_checked():
    from drb_uring.domains.config import split_device
    assert PairConfig(name="m", users=64, size=64 << 20).users == 64
    with pytest.raises(SpecError, match=r"--users must be in \[1, 64\], got 65"):
        PairConfig(name="m", users=65)
    with pytest.raises(SpecError, match=r"--users must be in \[1, 64\], got 0"):
        PairConfig(name="m", users=0)
    with pytest.raises(SpecError, match="less than 1 MiB each"):
        PairConfig(name="m", users=64, size=32 << 20)
    with pytest.raises(SpecError, match=r"4 user domains of --extent 8388608 bytes need "
                                        r"33554432 bytes; the device has 16777216"):
        PairConfig(name="m", users=4, extent=8 << 20, size=16 << 20)
    with pytest.raises(SpecError, match="multiple of 4k"):
        PairConfig(name="m", extent=(1 << 20) + 512)
    with pytest.raises(SpecError, match="at least 1m"):
        PairConfig(name="m", extent=4096)
    with pytest.raises(SpecError, match="drb user add NAME --attach PID"):
        PairConfig(name="m", users=2, attach_user=5, attach_driver=6)
    # A backing file's size is known only when it is opened: checked then.
    assert PairConfig(name="m", users=64, backing="/x").users == 64
    with pytest.raises(SpecError, match="the device has"):
        split_device(16 << 20, 2, 9 << 20)


def test_default_split_rounds_down_to_a_mebibyte():
    from drb_uring.domains.config import split_device
    assert split_device(64 << 20, 1) == [(0, 64 << 20)]
    # 100 MiB + 5 bytes among 3: 33 MiB each, the rest unused.
    got = split_device((100 << 20) + 5, 3)
    assert got == [(0, 33 << 20), (33 << 20, 33 << 20), (66 << 20, 33 << 20)]
    ext = split_device(256 << 20, 16)
    assert len(ext) == 16 and all(n == 16 << 20 for _, n in ext)
    assert [b for b, _ in ext] == [k * (16 << 20) for k in range(16)]
    assert split_device(64 << 20, 2, 4 << 20) == [(0, 4 << 20), (4 << 20, 4 << 20)]
    with pytest.raises(SpecError, match="O_DIRECT alignment"):
        split_device(64 << 20, 2, (1 << 20) + 4096, align=8192)


def test_free_extent_for_a_user_domain_added_later():
    from drb_uring.domains.config import free_extent
    mib = 1 << 20
    assert free_extent(64 * mib, [(0, 16 * mib)], 16 * mib) == (16 * mib, 16 * mib)
    # The gap a removed user domain left comes first.
    assert free_extent(64 * mib, [(0, 16 * mib), (32 * mib, 16 * mib)], 16 * mib) == \
        (16 * mib, 16 * mib)
    assert free_extent(64 * mib, [], 64 * mib) == (0, 64 * mib)
    with pytest.raises(SpecError, match="no free extent of 16777216 bytes"):
        free_extent(32 * mib, [(0, 16 * mib), (16 * mib, 16 * mib)], 16 * mib)
    with pytest.raises(SpecError, match="no free extent"):
        free_extent(40 * mib, [(0, 16 * mib), (16 * mib, 16 * mib)], 16 * mib)


def test_user_names():
    from drb_uring.domains.config import user_index, user_name
    assert [user_index(n) for n in ("user", "user0", "user7", "user63")] == [0, 0, 7, 63]
    assert [user_index(n) for n in ("driver", "user00", "user07", "users", "user-1", "")] == \
        [-1] * 6
    assert user_name("user") == "user0" and user_name("user3") == "user3"
