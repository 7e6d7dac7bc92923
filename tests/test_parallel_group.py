"""Process-group helpers: who is named when a peer fails, and a rank that never joins."""

import pytest
import torch


def test_peers_name_the_missing_rank_when_it_can_be_known():
    from geodnn.parallel.group import RankContext

    cpu = torch.device("cpu")
    two, five = RankContext(0, 2, 0, "gloo", cpu, 5.0), RankContext(2, 5, 2, "gloo", cpu, 5.0)
    assert two.peers() == "rank 1"  # a collective of two: the other one
    assert five.peers() == "another rank"
    assert five.peers(five.below, five.above) == "rank 1 or rank 3"
    assert RankContext(0, 5, 0, "gloo", cpu, 5.0).peers(None, 1) == "rank 1"


def test_a_rank_that_never_joins_is_one_line(monkeypatch):
    import torch.distributed as dist

    from geodnn.parallel.group import RankFailureError, init_ranks

    def store_timeout(*args, **kwargs):
        raise RuntimeError("wait timeout after 20000ms, keys: /default_pg/0//cpu//0\n  trace")

    monkeypatch.setattr(dist, "init_process_group", store_timeout)
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RankFailureError) as info:
        init_ranks(timeout_s=20)
    assert str(info.value) == (
        "rank 0: the 2 ranks did not all join at 127.0.0.1:29999 within 20 s (a rank died or "
        "hangs while starting, or the address is unreachable): wait timeout after 20000ms, keys: "
        "/default_pg/0//cpu//0"
    )
