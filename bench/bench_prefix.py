"""Prefix-caching benchmark: the same traffic against `moeserve serve` with and without prefix
caching, in one run, and the ratios.

Two workloads, each sent to both servers (greedy, `ignore_eos`, over gRPC):
- multi-turn chat: `--conversations` clients, each running `--turns` turns one after another; every
  prompt is the `--system-len`-token system prompt shared by all conversations, the conversation's
  history so far (each earlier user message and the tokens the server generated for it) and a new
  `--user-len`-token user message; `--reply-len` new tokens per turn. Conversations run concurrently.
- shared-prefix batch: `--batch` requests sent at once, each the same `--system-len`-token prefix
  (another one than the chat's, so the cache starts cold) plus `--user-len` tokens of its own: the
  requests admitted before the prefix's blocks are computed compute it too (the step's token budget
  decides how many), the rest reuse it.
Reported per workload and server: TTFT p50/p99, request and output-token throughput, and the hit
rate (prompt tokens the cache supplied, from each response's `usage.cached_prompt_tokens`, over all
prompt tokens); then TTFT p50/p99 and throughput ratios (without / with caching).

    python bench/bench_prefix.py --threads 1                         # the issue's run (bench preset)
    python bench/bench_prefix.py --preset tiny --conversations 4 --turns 3 --system-len 256   # smoke

Each server runs as a `moeserve serve` subprocess (one at a time); this is a script, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from bench_serving import percentile

from moeserve.v1 import inference_pb2_grpc as pb_grpc
from moeserve.workers.client import InferenceClient, build_request


@dataclass
class Result:
    """One request as the client saw it."""

    start: float
    first_token: float
    end: float
    output_ids: list[int]
    prompt_tokens: int
    cached_tokens: int

    @property
    def ttft(self) -> float:
        return self.first_token - self.start


@dataclass
class Summary:
    workload: str
    caching: bool
    requests: int
    duration_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    req_per_s: float
    out_tok_per_s: float
    hit_rate: float

    def row(self) -> str:
        mode = "cache on " if self.caching else "cache off"
        return (
            f"{self.workload:<14} {mode}  {self.requests:4d} req  {self.duration_s:7.1f} s  "
            f"TTFT p50 {self.ttft_p50_ms:8.1f} ms  p99 {self.ttft_p99_ms:8.1f} ms  "
            f"{self.req_per_s:6.2f} req/s  {self.out_tok_per_s:7.1f} out tok/s  hit rate {self.hit_rate:6.1%}"
        )


def summarize(workload: str, caching: bool, results: list[Result], duration: float) -> Summary:
    ttft = [r.ttft * 1e3 for r in results]
    prompt = sum(r.prompt_tokens for r in results)
    return Summary(
        workload,
        caching,
        len(results),
        duration,
        percentile(ttft, 50),
        percentile(ttft, 99),
        len(results) / duration,
        sum(len(r.output_ids) for r in results) / duration,
        sum(r.cached_tokens for r in results) / prompt if prompt else 0.0,
    )


def start_server(args: argparse.Namespace, model: Path, caching: bool) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "moeserve.workers.cli.main", "serve", "--model", str(model)]
    cmd += ["--dtype", args.dtype, "--host", "127.0.0.1", "--port", "0", "--no-metrics", "--no-http"]
    cmd += ["--max-num-seqs", str(max(args.conversations, args.batch))]
    cmd += ["--max-num-batched-tokens", str(args.max_batched_tokens)]
    cmd += ["--kv-cache-tokens", str(args.kv_cache_tokens), "--max-model-len", str(args.max_model_len)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if not caching:
        cmd.append("--no-prefix-caching")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    match = re.search(r"listening on \S+:(\d+)", proc.stdout.readline())
    if not match:
        proc.kill()
        raise SystemExit("server did not start")
    address = f"127.0.0.1:{match.group(1)}"
    with InferenceClient(address) as client:
        client.wait_serving(timeout=600)
        client.generate(build_request(prompt_token_ids=[2, 3, 4], max_tokens=4, ignore_eos=True))  # warm-up
    return proc, address


async def one_request(stub: pb_grpc.InferenceStub, prompt: list[int], max_tokens: int) -> Result:
    request = build_request(prompt_token_ids=prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    first = 0.0
    ids: list[int] = []
    cached = 0
    async for chunk in stub.Generate(request):
        if chunk.token_ids and not ids:
            first = time.perf_counter()
        ids.extend(chunk.token_ids)
        if chunk.HasField("usage"):
            cached = chunk.usage.cached_prompt_tokens
    return Result(start, first, time.perf_counter(), ids, len(prompt), cached)


async def multi_turn(address: str, args: argparse.Namespace, system: list[int]) -> tuple[list[Result], float]:
    rng = random.Random(args.seed + 1)
    users = [
        [[rng.randrange(2, args.vocab) for _ in range(args.user_len)] for _ in range(args.turns)]
        for _ in range(args.conversations)
    ]
    results: list[Result] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def conversation(c: int) -> None:
            history: list[int] = []
            for turn in range(args.turns):
                prompt = system + history + users[c][turn]
                result = await one_request(stub, prompt, args.reply_len)
                results.append(result)
                history = prompt[len(system) :] + result.output_ids  # the reply joins the history

        start = time.perf_counter()
        await asyncio.gather(*(conversation(c) for c in range(args.conversations)))
        return results, time.perf_counter() - start


async def shared_batch(
    address: str, args: argparse.Namespace, system: list[int]
) -> tuple[list[Result], float]:
    rng = random.Random(args.seed + 2)
    prefix = [rng.randrange(2, args.vocab) for _ in range(len(system))]  # not the chat's: a cold cache
    prompts = [
        prefix + [rng.randrange(2, args.vocab) for _ in range(args.user_len)] for _ in range(args.batch)
    ]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        start = time.perf_counter()
        results = await asyncio.gather(*(one_request(stub, p, args.reply_len) for p in prompts))
        return list(results), time.perf_counter() - start


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory (else --preset)")
    p.add_argument("--preset", default="bench", help="init-random preset when no --model: tiny or bench")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--system-len", type=int, default=1024, help="shared system prompt, tokens")
    p.add_argument("--user-len", type=int, default=64, help="tokens of each new user message")
    p.add_argument("--reply-len", type=int, default=32, help="tokens generated per turn")
    p.add_argument("--batch", type=int, default=32, help="requests of the shared-prefix batch")
    p.add_argument("--max-batched-tokens", type=int, default=2048, help="server's token budget per step")
    p.add_argument("--kv-cache-tokens", type=int, default=65536)
    p.add_argument("--threads", type=int, default=None, help="torch threads of the server")
    p.add_argument("--workloads", default="multi-turn,batch", help="comma-separated: multi-turn, batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the summaries here")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    workloads = args.workloads.split(",")
    if not set(workloads) <= {"multi-turn", "batch"}:
        raise SystemExit(f"--workloads: multi-turn or batch, got {args.workloads}")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            import torch

            from moeserve.workers.model.random_checkpoint import PRESETS, write_random_checkpoint

            model = write_random_checkpoint(
                Path(tmp) / args.preset, PRESETS[args.preset], getattr(torch, args.dtype)
            )
        config = json.loads((model / "config.json").read_text())
        args.vocab = int(config["vocab_size"])
        longest = args.system_len + args.turns * (args.user_len + args.reply_len)
        args.max_model_len = longest + 1
        rng = random.Random(args.seed)
        system = [rng.randrange(2, args.vocab) for _ in range(args.system_len)]
        print(
            f"model {model} ({config.get('hidden_size')} hidden, {config.get('num_hidden_layers')} layers, "
            f"{config.get('n_routed_experts')} experts), {args.dtype}, "
            f"server threads {args.threads or 'default'}; "
            f"multi-turn {args.conversations} conversations x {args.turns} turns, system {args.system_len}, "
            f"user {args.user_len}, reply {args.reply_len} tokens; batch {args.batch} x "
            f"({args.system_len} shared + {args.user_len})",
            flush=True,
        )
        summaries: list[Summary] = []
        for caching in (False, True):
            proc, address = start_server(args, model, caching)
            try:
                for name in workloads:
                    run = multi_turn if name == "multi-turn" else shared_batch
                    results, duration = asyncio.run(run(address, args, system))
                    summaries.append(summarize(name, caching, results, duration))
                    print(summaries[-1].row(), flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    print("\nwithout / with prefix caching:")
    for name in workloads:
        off, on = (next(s for s in summaries if s.workload == name and s.caching == c) for c in (False, True))
        print(
            f"{name:<14} TTFT p50 {off.ttft_p50_ms / on.ttft_p50_ms:5.2f}x lower, "
            f"p99 {off.ttft_p99_ms / on.ttft_p99_ms:5.2f}x lower; "
            f"throughput {on.out_tok_per_s / off.out_tok_per_s:5.2f}x higher; hit rate {on.hit_rate:.1%}"
        )
    if args.json:
        args.json.write_text(json.dumps([s.__dict__ for s in summaries], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
