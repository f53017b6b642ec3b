"""Serving benchmark: moeserve over gRPC (or its OpenAI HTTP API) under Poisson load vs
`transformers` static batches.

As vLLM's serving benchmark: requests with random prompts arrive at each given rate (Poisson; `inf`
sends them all at once), at most `--max-concurrency` in flight; we report request and output-token
throughput and TTFT / TPOT (time per output token after the first) p50 and p99. In the same run,
`transformers` `DeepseekV2ForCausalLM.generate` runs the same prompts offline in static batches of
`--hf-batch-size` (left-padded; each batch decodes until its longest request is done; only each
request's own tokens count), and the ratios are printed.

    python bench/bench_serving.py --preset bench --threads 1        # the issue's target run
    python bench/bench_serving.py --preset tiny --num-prompts 32     # a quick smoke run
    python bench/bench_serving.py --model DIR --rates 1,4,inf
    python bench/bench_serving.py --preset tiny --backend grpc,openai --skip-transformers   # HTTP overhead

`--backend` picks the API the same load generator drives: `grpc`, `openai` (streamed
/v1/completions with the official `openai` async client; one SSE chunk per engine step, tokens
counted from `usage`), or both in turn on the same server; with both, the openai/grpc ratios of
output tok/s and TTFT are printed.

The server runs as a `moeserve serve` subprocess; this is a script, not a test.
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
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from moeserve.v1 import inference_pb2_grpc as pb_grpc
from moeserve.workers.client import InferenceClient, build_request


@dataclass
class Record:
    """One request as the client saw it."""

    start: float
    token_times: list[float]
    output_tokens: int

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (self.output_tokens - 1)


@dataclass
class Summary:
    name: str
    requests: int
    duration_s: float
    output_tokens: int
    req_per_s: float
    out_tok_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summarize(name: str, records: list[Record], duration: float) -> Summary:
    out = sum(r.output_tokens for r in records)
    ttft = [r.ttft * 1e3 for r in records]
    tpot = [t * 1e3 for r in records if (t := r.tpot) is not None]
    return Summary(
        name,
        len(records),
        duration,
        out,
        len(records) / duration,
        out / duration,
        percentile(ttft, 50),
        percentile(ttft, 99),
        percentile(tpot, 50),
        percentile(tpot, 99),
    )


def make_workload(args: argparse.Namespace, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(args.seed)

    def length(mean: int) -> int:
        return max(1, rng.randint(int(mean * (1 - args.range_ratio)), int(mean * (1 + args.range_ratio))))

    return [
        ([rng.randrange(2, vocab) for _ in range(length(args.input_len))], length(args.output_len))
        for _ in range(args.num_prompts)
    ]


# ---------------------------------------------------------------- moeserve over gRPC
def start_server(
    args: argparse.Namespace, model: Path, max_len: int
) -> tuple[subprocess.Popen[str], str, str]:
    cmd = [sys.executable, "-m", "moeserve.workers.cli.main", "serve", "--model", str(model)]
    cmd += ["--dtype", args.dtype, "--host", "127.0.0.1", "--port", "0", "--no-metrics", "--http-port", "0"]
    cmd += ["--max-model-len", str(max_len), "--max-num-seqs", str(args.max_concurrency)]
    cmd += ["--max-num-batched-tokens", str(args.max_batched_tokens)]
    cmd += ["--kv-cache-tokens", str(args.max_concurrency * max_len)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    match = re.search(r"listening on \S+:(\d+).*OpenAI HTTP API on :(\d+)", proc.stdout.readline())
    if not match:
        proc.kill()
        raise SystemExit("server did not start")
    address = f"127.0.0.1:{match.group(1)}"
    with InferenceClient(address) as client:
        client.wait_serving(timeout=600)
        client.generate(build_request(prompt_token_ids=[2, 3, 4], max_tokens=4, ignore_eos=True))  # warm-up
    return proc, address, f"http://127.0.0.1:{match.group(2)}/v1"


async def one_request(stub: pb_grpc.InferenceStub, prompt: list[int], out_len: int) -> Record:
    request = build_request(prompt_token_ids=prompt, max_tokens=out_len, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    times: list[float] = []
    n = 0
    async for chunk in stub.Generate(request):
        if chunk.token_ids:
            now = time.perf_counter()
            times.extend([now] * len(chunk.token_ids))
            n += len(chunk.token_ids)
    return Record(start, times, n)


async def one_openai_request(client: object, prompt: list[int], out_len: int) -> Record:
    start = time.perf_counter()
    times: list[float] = []
    n = 0
    stream = await client.completions.create(  # type: ignore[attr-defined]
        model=None,
        prompt=prompt,
        max_tokens=out_len,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices:  # one chunk per engine step (its text may be empty: UTF-8 held back)
            times.append(time.perf_counter())
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    return Record(start, times, n)


async def poisson_run(
    address: str,
    workload: list[tuple[list[int], int]],
    rate: float,
    max_concurrency: int,
    seed: int,
    http_url: str | None = None,
) -> tuple[list[Record], float]:
    """The workload against gRPC at `address`, or against the OpenAI API at `http_url` if given."""
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        api = None
        if http_url is not None:
            import openai

            # its default pool (100 keep-alive connections) covers --max-concurrency
            api = openai.AsyncOpenAI(base_url=http_url, api_key="none", max_retries=0, timeout=600)

        async def guarded(prompt: list[int], out_len: int) -> Record:
            async with limit:
                if api is not None:
                    return await one_openai_request(api, prompt, out_len)
                return await one_request(stub, prompt, out_len)

        begin = time.perf_counter()
        tasks = []
        for prompt, out_len in workload:
            tasks.append(asyncio.create_task(guarded(prompt, out_len)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - begin
        if api is not None:
            await api.close()
        return list(records), duration


# ---------------------------------------------------------------- transformers, static batches
def run_transformers(args: argparse.Namespace, model: Path, workload: list[tuple[list[int], int]]) -> Summary:
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    hf = transformers.DeepseekV2ForCausalLM.from_pretrained(
        model, dtype=dtype, attn_implementation=args.hf_attn
    ).eval()

    class Clock(BaseStreamer):
        """Times of generate()'s puts: the first is the prompt, then one per decoding step."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: object) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def generate(batch: list[tuple[list[int], int]]) -> list[Record]:
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        steps = max(n for _, n in batch)
        clock = Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            hf.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=False,
                pad_token_id=0,
                streamer=clock,
            )
        token_times = clock.times[1:]
        return [Record(start, token_times[:n], n) for _, n in batch]  # padding steps do not count

    generate([([2, 3, 4], 2)])  # warm-up
    records: list[Record] = []
    begin = time.perf_counter()
    for i in range(0, len(workload), args.hf_batch_size):
        records += generate(workload[i : i + args.hf_batch_size])
    name = f"transformers static batch {args.hf_batch_size} ({args.hf_attn})"
    return summarize(name, records, time.perf_counter() - begin)


# ---------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory (else --preset)")
    p.add_argument("--preset", default="bench", help="init-random preset when no --model: tiny or bench")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.5, help="lengths uniform in len*(1 -/+ ratio)")
    p.add_argument("--rates", default="2,8,inf", help="request rates per second; inf = all at once")
    p.add_argument("--max-concurrency", type=int, default=32)
    p.add_argument("--max-batched-tokens", type=int, default=512, help="server's token budget per step")
    p.add_argument("--hf-batch-size", type=int, default=32)
    p.add_argument(
        "--hf-attn",
        default="eager",
        choices=["eager", "sdpa"],
        help="transformers attention; eager is the faster one for left-padded batches on CPU (default)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads, both sides (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument(
        "--backend", default="grpc", help="API(s) to drive, comma-separated: grpc, openai (default grpc)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the summaries here")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            import torch

            from moeserve.workers.model.random_checkpoint import PRESETS, write_random_checkpoint

            dtype = getattr(torch, args.dtype)
            model = write_random_checkpoint(Path(tmp) / args.preset, PRESETS[args.preset], dtype)
        config = json.loads((model / "config.json").read_text())
        workload = make_workload(args, int(config["vocab_size"]))
        max_len = max(len(p) + n for p, n in workload) + 1
        print(
            f"model {model} ({config.get('hidden_size')} hidden, {config.get('num_hidden_layers')} layers, "
            f"{config.get('n_routed_experts')} experts), {args.dtype}, threads {args.threads or 'default'}; "
            f"{len(workload)} prompts, input {args.input_len} / output {args.output_len} tokens "
            f"(+-{args.range_ratio:.0%}), max concurrency {args.max_concurrency}",
            flush=True,
        )
        summaries: list[Summary] = []
        backends = args.backend.split(",")
        if not set(backends) <= {"grpc", "openai"}:
            raise SystemExit(f"--backend: grpc or openai, got {args.backend}")
        proc, address, http_url = start_server(args, model, max_len)
        try:
            for rate_text in args.rates.split(","):
                rate = float(rate_text)
                for backend in backends:
                    url = http_url if backend == "openai" else None
                    records, duration = asyncio.run(
                        poisson_run(address, workload, rate, args.max_concurrency, args.seed, url)
                    )
                    name = "moeserve" if backend == "grpc" else "moeserve openai"
                    summaries.append(summarize(f"{name} rate {rate_text}/s", records, duration))
                    print(format_row(summaries[-1]), flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        if not args.skip_transformers:
            summaries.append(run_transformers(args, model, workload))
            print(format_row(summaries[-1]), flush=True)
    print_report(summaries)
    if args.json:
        args.json.write_text(json.dumps([asdict(s) for s in summaries], indent=2))
    return 0


def format_row(s: Summary) -> str:
    return (
        f"{s.name:<32} {s.requests:>4} req {s.duration_s:7.1f}s  {s.req_per_s:6.2f} req/s "
        f"{s.out_tok_per_s:8.1f} out tok/s  TTFT p50/p99 {s.ttft_p50_ms:8.0f}/{s.ttft_p99_ms:8.0f} ms  "
        f"TPOT p50/p99 {s.tpot_p50_ms:6.1f}/{s.tpot_p99_ms:6.1f} ms"
    )


def print_report(summaries: list[Summary]) -> None:
    print("\n" + "\n".join(format_row(s) for s in summaries))
    by_name = {s.name: s for s in summaries}
    for s in summaries:
        grpc_run = by_name.get(s.name.replace("moeserve openai", "moeserve"))
        if s.name.startswith("moeserve openai") and grpc_run is not None:
            print(
                f"{s.name} / gRPC: output tok/s {s.out_tok_per_s / grpc_run.out_tok_per_s:.3f}x, "
                f"TTFT p50 {s.ttft_p50_ms / grpc_run.ttft_p50_ms:.3f}x, "
                f"p99 {s.ttft_p99_ms / grpc_run.ttft_p99_ms:.3f}x"
            )
    hf = [s for s in summaries if s.name.startswith("transformers")]
    if not hf:
        return
    base = hf[0]
    for s in summaries:
        if s is not base:
            print(
                f"{s.name}: {s.out_tok_per_s / base.out_tok_per_s:.2f}x transformers output tokens/s, "
                f"TPOT p50 {base.tpot_p50_ms / s.tpot_p50_ms:.2f}x lower"
            )
    print("(median of the per-request figures above; transformers ran offline with all prompts at hand)")


if __name__ == "__main__":
    sys.exit(main())
