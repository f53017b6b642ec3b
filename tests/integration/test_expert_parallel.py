"""Expert parallelism over real local processes (gloo): A attention ranks + E expert ranks.

The reference is the single-process model (`generate_lockstep` without a world, itself checked
against `generate()`): fp32 logits within 1e-5 and identical greedy tokens, with and without
micro-batch ping-pong, with uneven loads; a killed or hung rank fails every other rank within the
collective timeout; bad maps never start a process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeserve.workers.model.config import ModelConfig
from moeserve.workers.model.loader import load_model
from moeserve.workers.offline.generate import GenerationSettings, LockstepResult, generate, generate_lockstep
from moeserve.workers.offline.local_world import LocalWorld, RankFailure, launch_local
from moeserve.workers.offline.rank import RankResult, Run
from moeserve.workers.parallel.placement import PlacementError
from moeserve.workers.parallel.settings import EPSettings

pytestmark = pytest.mark.integration

# lengths 5, 17, 33 and 3 cross block boundaries (block size 16)
PROMPTS = [list(range(10, 15)), list(range(30, 47)), list(range(60, 93)), [7, 8, 9]]
SETTINGS = GenerationSettings(max_tokens=6)


def reference(path: Path, prompts: list[list[int]]) -> LockstepResult:
    model = load_model(path)
    ref = generate_lockstep(model, prompts, SETTINGS, model.local_executor(), record_logits=True)
    assert ref.token_ids == generate(model, prompts, SETTINGS)  # the reference is the real thing
    return ref


def gathered(results: list[RankResult], run: int, placement: list[list[int]]) -> dict[int, tuple]:
    """prompt index -> (tokens, logits) from the attention ranks that served it."""
    out = {}
    for rank, indices in enumerate(placement):
        res = results[rank]
        for j, i in enumerate(indices):
            out[i] = (res.token_ids[run][j], res.logits[run][j])
    return out


def assert_matches(got: dict[int, tuple], ref: LockstepResult) -> None:
    assert sorted(got) == list(range(len(ref.token_ids)))
    for i, (tokens, logits) in got.items():
        assert tokens == ref.token_ids[i], f"prompt {i}"
        assert logits.shape == ref.logits[i].shape
        assert (logits - ref.logits[i]).abs().max().item() <= 1e-5, f"prompt {i}"


@pytest.mark.parametrize(
    "name, a, e",
    [("v2_lite", 1, 1), ("v3", 1, 2), ("v2_lite", 2, 3), ("v2", 2, 3)],
    ids=["v2_lite-1x1", "v3-1x2", "v2_lite-2x3", "v2_grouped-2x3"],
)
def test_world_matches_single_process(name: str, a: int, e: int, reference_checkpoints) -> None:
    path = reference_checkpoints[name]
    ref = reference(path, PROMPTS)
    round_robin = [list(range(r, len(PROMPTS), a)) for r in range(a)]
    uneven: list[list[int]] = [[]] * (a - 1) + [[0, 1, 2]]  # the last rank takes 3, the others none
    runs = [
        Run(tuple([PROMPTS[i] for i in ids] for ids in round_robin), SETTINGS, False, True),
        Run(tuple([PROMPTS[i] for i in ids] for ids in round_robin), SETTINGS, True, True),
        Run(tuple([PROMPTS[i] for i in ids] for ids in uneven), SETTINGS, True, True),
    ]
    results = launch_local(path, EPSettings(a, e, collective_timeout_s=60), runs)

    plain, split = gathered(results, 0, round_robin), gathered(results, 1, round_robin)
    assert_matches(plain, ref)  # no split
    assert_matches(split, ref)  # ping-pong
    for i in plain:  # and the two paths agree with each other
        assert split[i][0] == plain[i][0]
        assert (split[i][1] - plain[i][1]).abs().max().item() <= 1e-5
    uneven_ref = LockstepResult(ref.token_ids[:3], ref.logits[:3])
    assert_matches(gathered(results, 2, uneven), uneven_ref)
    # every rank took part in every step, idle attention ranks included
    for run in range(3):
        assert len({r.steps[run] for r in results}) == 1
    config = ModelConfig.from_file(path)
    experts = [r for r in results if r.role == "expert"]
    per_expert = experts[0].weight_bytes // len(EPSettings(a, e).expert_placement(config).ranks[0])
    for i, r in enumerate(experts):
        hosted = EPSettings(a, e).expert_placement(config).ranks[i]
        assert r.weight_bytes == per_expert * len(hosted)  # an expert rank holds only its experts
        assert r.stats[0]["bytes_received"] > 0
    whole = load_model(path)
    routed = sum(p.numel() * p.element_size() for x in whole.local_experts().values() for p in x.parameters())
    total = sum(p.numel() * p.element_size() for p in whole.parameters())
    for r in results[:a]:
        assert r.weight_bytes == total - routed  # an attention rank holds no routed expert
        if name == "v2":  # groups aligned to ranks: a token reaches at most topk_group ranks
            assert 0 < r.stats[0]["max_ranks_per_token"] <= config.topk_group


def long_run(a: int) -> list[Run]:
    """Enough decode steps that the run is still going when a rank is killed or stopped."""
    prompts = tuple([[1 + r, 2, 3]] for r in range(a))
    return [Run(prompts, GenerationSettings(max_tokens=900, stop_at_eos=False))]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_failed_expert_rank_fails_every_other_rank_within_the_timeout(sig, reference_checkpoints) -> None:
    timeout = 5.0 if sig == signal.SIGSTOP else 10.0
    world = LocalWorld(
        reference_checkpoints["v2_lite"], EPSettings(2, 2, collective_timeout_s=timeout), long_run(2)
    )
    world.start()
    world.wait_ready(120)
    time.sleep(0.5)
    victim = 3  # expert rank 1
    hit = time.time()
    os.kill(world.pid(victim), sig)
    with pytest.raises(RankFailure) as info:
        world.join()
    failure = info.value
    assert failure.first == victim
    expected = "signal SIGKILL" if sig == signal.SIGKILL else "killed by the launcher"
    assert expected in failure.errors[victim].message
    for rank in (0, 1, 2):
        error = failure.errors[rank]
        assert error.collective, error.message
        assert world.layout.describe(rank) in error.message
        assert error.at - hit < timeout + 2.0, (rank, error.at - hit)
    assert "expert rank 1 (global rank 3) failed" in str(failure)
    assert time.time() - hit < 2 * timeout + 10


def test_invalid_maps_start_no_process(reference_checkpoints) -> None:
    path = reference_checkpoints["v2_lite"]  # 8 experts
    runs = [Run(([[1, 2]],))]
    for settings in (
        EPSettings(1, 9),
        EPSettings(1, 2, placement=((0, 1, 2, 3), (3, 4, 5, 6, 7))),
        EPSettings(1, 2, placement=((0, 1, 2), (4, 5, 6, 7))),
    ):
        with pytest.raises(PlacementError):
            LocalWorld(path, settings, runs)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moeserve.workers.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_expert_parallel_prints_the_single_process_output(reference_checkpoints) -> None:
    path = reference_checkpoints["v2"]
    ids = ["1,2,3", "7,8", "40,41,42,43,44", "9"]
    args = [a for i in ids for a in ("--prompt-ids", i)]
    res = run_cli(
        "generate",
        "--model",
        str(path),
        *args,
        "--max-tokens",
        "5",
        "--json",
        "--attention-ranks",
        "2",
        "--expert-ranks",
        "3",
        "--ping-pong",
    )
    assert res.returncode == 0, res.stderr
    got = [json.loads(line)["token_ids"] for line in res.stdout.splitlines()]
    prompts = [[int(t) for t in i.split(",")] for i in ids]
    assert got == generate(load_model(path), prompts, GenerationSettings(max_tokens=5))


def test_cli_reports_the_rank_that_failed(reference_checkpoints, tmp_path: Path) -> None:
    src = reference_checkpoints["v2_lite"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.2.mlp.experts.6.up_proj.weight"]  # hosted by expert rank 1 of 2
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    res = run_cli(
        "generate",
        "--model",
        str(broken),
        "--prompt-ids",
        "1,2",
        "--max-tokens",
        "3",
        "--attention-ranks",
        "1",
        "--expert-ranks",
        "2",
        "--collective-timeout",
        "10",
    )
    assert res.returncode == 1
    assert "expert rank 1 (global rank 2) failed" in res.stderr
    assert "missing routed expert 6" in res.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attention-ranks", "2"], "need --expert-ranks >= 1"),
        (["--ping-pong"], "need --expert-ranks >= 1"),
        (["--expert-ranks", "9"], "9 expert ranks for 8 experts"),
        (["--expert-ranks", "2", "--expert-map", "0-3;3-7"], "expert 3 is hosted twice"),
        (["--expert-ranks", "2", "--expert-map", "0-3"], "lists 1 expert ranks, expected 2"),
        (["--expert-ranks", "-1"], "--expert-ranks"),
        (["--attention-ranks", "0", "--expert-ranks", "1"], "--attention-ranks"),
        (["--expert-ranks", "1", "--collective-timeout", "0"], "--collective-timeout"),
    ],
)
def test_cli_rejects_invalid_combinations(
    args: list[str], message: str, reference_checkpoints, capsys
) -> None:
    from moeserve.workers.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", str(reference_checkpoints["v2_lite"]), "--prompt-ids", "1,2", *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_idle_world_steps_zero_times(reference_checkpoints) -> None:
    """No prompts anywhere: the first step-control collective stops every rank at once."""
    results = launch_local(reference_checkpoints["v2_lite"], EPSettings(2, 1), [Run(([], []))])
    assert [r.steps for r in results] == [[0], [0], [0]]
    assert torch.tensor([r.stats[0]["layer_calls"] for r in results]).sum() == 0
