"""The cache-aware routing rule and the router's prefix index; the `--no-prefix-caching` flag and
the settings' round trip through the Serve config."""

from __future__ import annotations

import pytest

from moeserve.serve_config import ServeAppConfig, ServeConfigError
from moeserve.workers.cli.main import build_parser
from moeserve.workers.cli.serve import engine_settings
from moeserve.workers.engine.prefix_routing import LOAD_MARGIN, PrefixIndex, choose

pytestmark = pytest.mark.unit


def test_the_longest_cached_prefix_wins_within_the_load_margin() -> None:
    assert choose([0, 5, 3], [0, 0, 0]) == 1
    assert choose([0, 5, 3], [0, 8, 0], margin=8) == 1  # 8 beyond the least loaded: still allowed
    assert choose([0, 5, 3], [0, 9, 0], margin=8) == 0  # 9 beyond: overloaded, the least loaded
    assert choose([4, 4], [3, 1]) == 1  # equal prefixes: the less loaded
    assert choose([0, 0, 0], [2, 1, 1]) == 1  # nothing cached: least loaded, then lowest index
    assert choose([0, 0], [1, 1], sizes=[10, 2]) == 1  # ... then the emptiest index
    assert LOAD_MARGIN == 8
    with pytest.raises(ValueError):
        choose([1], [0, 0])


def test_the_index_matches_leading_blocks_and_forgets_least_recent_first() -> None:
    index: PrefixIndex[str] = PrefixIndex(block_size=4, capacity_blocks=4)
    system = list(range(100, 108))  # 2 blocks
    a, b = system + [1, 2, 3, 4], system + [5, 6, 7, 8]
    index.record("r0", index.hashes(a))
    assert index.matched_blocks("r0", index.hashes(b)) == 2
    assert index.matched_blocks("r0", index.hashes(a)) == 3
    assert index.matched_blocks("r1", index.hashes(a)) == 0
    assert index.matched_blocks("r0", index.hashes([9] + a)) == 0  # a shifted prompt shares nothing
    index.record("r0", index.hashes(b))  # 4 distinct blocks now: at capacity
    index.record("r0", index.hashes(list(range(50, 54))))  # one more: a's tail, the oldest, goes
    assert index.matched_blocks("r0", index.hashes(a)) == 2
    assert index.matched_blocks("r0", index.hashes(b)) == 3
    assert index.choose(["r1", "r0"], [0, 0], index.hashes(b), margin=8) == "r0"
    index.forget("r0")
    assert index.size("r0") == 0 and index.choose(["r0", "r1"], [1, 0], index.hashes(b), 8) == "r1"


def test_no_prefix_caching_flag_turns_it_off() -> None:
    parser = build_parser()
    on = engine_settings(parser, parser.parse_args(["serve"]))
    off = engine_settings(parser, parser.parse_args(["serve", "--no-prefix-caching"]))
    assert on.prefix_caching and not off.prefix_caching


def test_prefix_caching_round_trips_through_the_serve_config() -> None:
    cfg = ServeAppConfig.from_dict({"engine": {"prefix_caching": False}})
    assert cfg.engine.prefix_caching is False
    assert ServeAppConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ServeConfigError, match="engine.prefix_caching: expected true or false"):
        ServeAppConfig.from_dict({"engine": {"prefix_caching": "no"}})
