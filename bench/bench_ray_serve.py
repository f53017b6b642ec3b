"""Ray Serve overhead: TTFT and output tokens/s through Ray Serve's gRPC proxy vs `moeserve serve`.

In one run, on the same model (a tiny generated checkpoint unless `--model`), the same closed-loop
workload (`--num-prompts` random prompts, `--concurrency` streams at once, greedy, `--max-tokens`
each) goes to three servers started in turn as subprocesses:
  single  `moeserve serve` (whole model in one process),
  ep      `moeserve serve --attention-ranks A --expert-ranks E` (local rank processes),
  ray     `moeserve serve --ray --attention-ranks A --expert-ranks E` (Serve proxy -> ingress ->
          model-instance replica -> rank actors).
It prints TTFT p50/p99 and output tokens/s of each and the ratios ray/ep and ray/single.

    python bench/bench_ray_serve.py                      # tiny model, A=1, E=2
    python bench/bench_ray_serve.py --num-prompts 64 --concurrency 8 --max-tokens 32

A script, not a test.
"""

from __future__ import annotations

import argparse
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from moeserve.workers.client import InferenceClient, build_request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one(address: str, prompt: list[int], max_tokens: int) -> tuple[float, int]:
    """(TTFT seconds, output tokens) of one greedy streamed request."""
    with InferenceClient(address) as client:
        start, first, tokens = time.perf_counter(), None, 0
        for chunk in client.stream(build_request(None, prompt, max_tokens=max_tokens, temperature=0.0)):
            if first is None and chunk.token_ids:
                first = time.perf_counter()
            tokens += len(chunk.token_ids)
    return (first or time.perf_counter()) - start, tokens


def workload(address: str, args: argparse.Namespace) -> dict[str, float]:
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 380) for _ in range(rng.randint(4, 48))] for _ in range(args.num_prompts)]
    one(address, prompts[0], 2)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(lambda p: one(address, p, args.max_tokens), prompts))
    wall = time.perf_counter() - start
    ttfts = sorted(t for t, _ in results)
    return {
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        "output_tok_s": sum(n for _, n in results) / wall,
    }


def run_server(name: str, extra: list[str], model: Path, args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "moeserve.workers.cli.main",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
    ]
    cmd += ["--no-metrics", "--no-http", "--threads", "1", "--max-model-len", "256", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:  # the Serve proxy has no standard health service: probe with ModelInfo
            try:
                with InferenceClient(address) as client:
                    client.model_info(timeout=2)
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{name} server did not come up") from None
                time.sleep(1)
        result = workload(address, args)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"{name:7s} " + "  ".join(f"{k} {v:.4g}" for k, v in result.items()), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: a tiny one)")
    parser.add_argument("--attention-ranks", type=int, default=1)
    parser.add_argument("--expert-ranks", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    model = args.model
    if model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from builders import write_serving_checkpoint

        model = write_serving_checkpoint(Path(tempfile.mkdtemp()) / "tiny-v2")
    ranks = ["--attention-ranks", str(args.attention_ranks), "--expert-ranks", str(args.expert_ranks)]
    single = run_server("single", [], model, args)
    ep = run_server("ep", ranks, model, args)
    ray = run_server("ray", ["--ray", *ranks], model, args)
    for ref_name, ref in (("ep", ep), ("single", single)):
        print(
            f"ray/{ref_name}: TTFT p50 x{ray['ttft_p50_s'] / ref['ttft_p50_s']:.2f}, "
            f"output tokens/s x{ray['output_tok_s'] / ref['output_tok_s']:.2f}"
        )


if __name__ == "__main__":
    main()
