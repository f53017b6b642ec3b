"""`moeserve plan` (capacity planner) and `moeserve experts plot` (load picture) on small inputs.

The planner's memory and byte figures are checked against the formulas from the config, its
imbalance against the placement code on the same trace; the plot reads Prometheus text (as a
server's /metrics has it) and writes a PNG; bad inputs exit 2 naming the flag.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from moeserve.workers.cli.experts import rank_load, read_metrics
from moeserve.workers.cli.main import main
from moeserve.workers.cli.plan import stretch
from moeserve.workers.model.transformer import Transformer
from moeserve.workers.parallel.eplb import imbalance
from moeserve.workers.parallel.placement import ExpertPlacement

pytestmark = pytest.mark.unit


RAW = dict(
    model_type="deepseek_v2",
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=3,
    num_attention_heads=2,
    kv_lora_rank=8,
    qk_nope_head_dim=4,
    qk_rope_head_dim=4,
    v_head_dim=4,
    intermediate_size=24,
    moe_intermediate_size=8,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    topk_method="greedy",
)


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(RAW))
    return path


def plan_rows(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict]:
    assert main(["plan", *args, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_plan_figures_follow_from_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path)
    from moeserve.workers.model.config import ModelConfig

    cfg = ModelConfig.from_file(path)
    trace = tmp_path / "counts.json"
    load = [800, 100, 50, 25, 10, 10, 3, 2]
    trace.write_text(json.dumps({str(cfg.moe_layers[0]): load}))
    rows = plan_rows(capsys, "--model", str(path), "--gpus", "4", "--trace", str(trace), "--seqs", "8")
    assert [(r["attention_ranks"], r["expert_ranks"]) for r in rows] == [(3, 1), (2, 2), (1, 3)]
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 2 * len(cfg.moe_layers)  # bf16, all layers
    kv = cfg.latent_dim * cfg.num_hidden_layers * 2 * 4096 * 8
    dense = sum(p.numel() for p in Transformer(cfg, with_routed_experts=False).parameters()) * 2
    for r in rows:
        e = r["expert_ranks"]
        assert r["expert_rank_gib"] == pytest.approx(math.ceil(8 / e) * expert / 2**30)
        assert r["expert_rank_gib_redundant"] == pytest.approx(r["slots_per_expert_rank"] * expert / 2**30)
        assert r["kv_cache_gib"] == pytest.approx(kv / 2**30)
        assert r["weights_gib"] == pytest.approx(dense / 2**30)
        assert r["imbalance_contiguous"] == pytest.approx(imbalance(ExpertPlacement.contiguous(8, e), load))
        assert r["imbalance_eplb"] <= r["imbalance_contiguous"] + 1e-9
        assert r["imbalance_eplb_redundant"] <= r["imbalance_contiguous"] + 1e-9
    two = rows[1]  # K=2 of 8 experts on 2 ranks: a token reaches 2 * (1 - C(4,2)/C(8,2)) ranks
    assert two["ranks_per_token"] == pytest.approx(2 * (1 - 6 / 28))
    per_token = two["ranks_per_token"] * (2 * cfg.hidden_size * 2 + 8 * 2)
    assert two["a2a_mib_per_attention_rank"] == pytest.approx(8 * per_token * len(cfg.moe_layers) / 2**20)


def test_a_small_trace_stretches_onto_many_experts() -> None:
    out = stretch([30.0, 10.0, 0.0, 60.0], 8)
    assert sum(out) == pytest.approx(100.0)
    assert out == sorted(out, reverse=True) and out[0] == out[1] > out[2]


@pytest.mark.parametrize(
    "extra, message",
    [(["--gpus", "1"], "--gpus"), (["--gpus", "4", "--trace", "missing.json"], "--trace")],
)
def test_plan_rejects_bad_input(tmp_path: Path, extra: list[str], message: str) -> None:
    path = write_config(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["plan", "--model", str(path), *extra])
    assert info.value.code == 2


METRICS = """\
# TYPE moeserve_expert_tokens_total counter
moeserve_expert_tokens_total{layer="1",expert="0"} 600.0
moeserve_expert_tokens_total{layer="1",expert="1"} 200.0
moeserve_expert_tokens_total{layer="1",expert="2"} 100.0
moeserve_expert_tokens_total{layer="1",expert="3"} 100.0
# TYPE moeserve_expert_map gauge
moeserve_expert_map{layer="1",expert_rank="0",expert="0"} 1.0
moeserve_expert_map{layer="1",expert_rank="0",expert="3"} 1.0
moeserve_expert_map{layer="1",expert_rank="0",expert="1"} 1.0
moeserve_expert_map{layer="1",expert_rank="1",expert="0"} 1.0
moeserve_expert_map{layer="1",expert_rank="1",expert="2"} 1.0
"""


def test_metrics_give_the_load_and_the_current_map() -> None:
    load, maps = read_metrics(METRICS)
    assert load == {1: [600.0, 200.0, 100.0, 100.0]}
    assert maps == {1: [[0, 1, 3], [0, 2]]}
    assert rank_load(load, maps) == [300 + 200 + 100, 300 + 100]  # expert 0 split over its replicas


def test_plot_writes_a_png(tmp_path: Path) -> None:
    text = tmp_path / "metrics.txt"
    text.write_text(METRICS)
    out = tmp_path / "load.png"
    assert main(["experts", "plot", "--metrics", text.as_uri(), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_rejects_metrics_without_expert_load(tmp_path: Path) -> None:
    text = tmp_path / "metrics.txt"
    text.write_text("# TYPE other counter\nother_total 1.0\n")
    with pytest.raises(SystemExit) as info:
        main(["experts", "plot", "--metrics", text.as_uri(), "--out", str(tmp_path / "x.png")])
    assert info.value.code == 2
