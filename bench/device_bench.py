"""Decode and prefill figures of moeserve and `transformers` on one device, written as JSON.

The measuring half of `bench/device_check.sh` (which runs it with the H200 settings; see there).
Random bf16 weights of a preset (`v2-lite`: the full DeepSeek-V2-Lite shape) are drawn on the
device by `transformers` itself, and moeserve loads the very same tensors through its own loader
(an in-memory checkpoint reader, so 31 GB never go through a disk). The two models are measured one
after the other, so each one's peak memory is its own.

Figures: decode tokens/s per batch size (prompts of `--prompt` tokens, `--new-tokens` timed steps
after two warm-up steps) for moeserve with CUDA graphs, moeserve with `--enforce-eager`, and
transformers; the ratios; the batch-1 fraction of the memory roofline (active weight bytes per
token / measured device-to-device copy bandwidth); time to first token of a `--ttft-prompt` prompt;
peak device memory. Also the relative logit difference of the two models on one prompt, as a check
that they compute the same thing.

    python bench/device_bench.py --preset tiny --device cpu --out /tmp/bench.json   # rehearsal size
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_decode import active_weight_bytes  # noqa: E402

from moeserve.workers.model.batch import ForwardBatch, SequenceStep  # noqa: E402
from moeserve.workers.model.cuda_graphs import CudaGraphDecoder  # noqa: E402
from moeserve.workers.model.kv_cache import PagedLatentCache  # noqa: E402
from moeserve.workers.model.loader import load_model  # noqa: E402
from moeserve.workers.model.random_checkpoint import PRESETS  # noqa: E402
from moeserve.workers.model.transformer import Transformer  # noqa: E402
from moeserve.workers.offline.generate import make_cache  # noqa: E402

BLOCK_SIZE = 64
StepFn = Callable[[ForwardBatch], torch.Tensor]
StepFactory = Callable[[PagedLatentCache], StepFn]  # a decode step over one cache


class MemoryReader:
    """`CheckpointReader`'s interface over a transformers model's tensors, under checkpoint names.
    transformers 5 stores routed experts fused ([E, 2I, D] gate ; up and [E, D, I]); the per-expert
    checkpoint names are slices of those."""

    _EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")

    def __init__(self, state: dict[str, torch.Tensor], num_experts: int):
        self.state = state
        self.expert_names: list[str] = []
        for name in state:
            fused = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.gate_up_proj$", name)
            if fused:
                for e in range(num_experts):
                    self.expert_names += [f"{fused[1]}.{e}.{p}_proj.weight" for p in ("gate", "up", "down")]

    @property
    def names(self) -> list[str]:
        fused = {n for n in self.state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
        return [n for n in self.state if n not in fused] + self.expert_names

    def shape(self, name: str) -> list[int]:
        return list(self.read(name).shape)

    def read(self, name: str) -> torch.Tensor:
        match = self._EXPERT.match(name)
        if match is None or name in self.state:
            return self.state[name]
        prefix, expert, part = match[1], int(match[2]), match[3]
        if part == "down":
            return self.state[f"{prefix}.down_proj"][expert]
        gate_up = self.state[f"{prefix}.gate_up_proj"][expert]  # [2I, D]
        half = gate_up.shape[0] // 2
        return gate_up[:half] if part == "gate" else gate_up[half:]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_hf(checkpoint: Path, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """transformers' DeepseekV2ForCausalLM with its own random init, built on the device."""
    from transformers import AutoConfig, DeepseekV2ForCausalLM

    config = AutoConfig.from_pretrained(checkpoint)
    torch.manual_seed(seed)
    with default_dtype(dtype), torch.device(device):
        model = DeepseekV2ForCausalLM(config)
    return model.eval()


def prompts(batch: int, length: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(batch * 7 + length)
    return torch.randint(2, vocab, (batch, length), generator=gen)


def eager_step(model: Transformer) -> StepFactory:
    """moeserve with --enforce-eager: every step through `Transformer.forward`."""
    return lambda cache: lambda batch: model(batch, cache)


def graph_step(model: Transformer, max_batch: int, max_context: int) -> StepFactory:
    """moeserve's decode step through CUDA graphs (on the CPU: the same static step, no capture)."""

    def make(cache: PagedLatentCache) -> StepFn:
        decoder = CudaGraphDecoder(model, cache, max_batch, max_context)

        def step(batch: ForwardBatch) -> torch.Tensor:
            logits = decoder.decode(batch)
            if logits is None:
                raise RuntimeError(f"a decode step of {batch.num_seqs} sequences did not fit a graph")
            return logits

        return step

    return make


@torch.inference_mode()
def ours_decode(
    model: Transformer, make_step: StepFactory, ids: torch.Tensor, new_tokens: int, warmup: int = 2
) -> tuple[float, list[int]]:
    """Seconds per decode step over `new_tokens` timed steps (prefill and warm-up, which captures
    the graphs, excluded), and the first sequence's generated ids."""
    device = model.device
    b, n = ids.shape
    cache = make_cache(model, [n + new_tokens + warmup + 1] * b, BLOCK_SIZE)
    step = make_step(cache)
    seqs = [cache.new_sequence() for _ in range(b)]
    pending = [row.tolist() for row in ids]
    out: list[int] = []
    elapsed = 0.0
    for i in range(1 + warmup + new_tokens):
        sync(device)
        t0 = time.perf_counter()
        steps = []
        for seq, toks in zip(seqs, pending, strict=True):
            seq.reserve(cache.allocator, len(toks))
            steps.append(SequenceStep(toks, seq.num_tokens, seq.blocks))
        batch = ForwardBatch.build(steps, BLOCK_SIZE, device)
        logits = step(batch) if i > 0 else model(batch, cache)  # step 0: prefill, eager
        nxt = logits.argmax(-1).tolist()  # the host needs the tokens: this syncs
        if i > warmup:
            elapsed += time.perf_counter() - t0
        for seq, toks in zip(seqs, pending, strict=True):
            seq.num_tokens += len(toks)
        pending = [[t] for t in nxt]
        out.append(nxt[0])
    return elapsed / new_tokens, out


@torch.inference_mode()
def hf_decode(
    model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, warmup: int = 2
) -> tuple[float, list[int]]:
    device = next(model.parameters()).device
    ids = ids.to(device)
    out = model(ids, use_cache=True)
    cache = out.past_key_values
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [int(nxt[0])]
    elapsed = 0.0
    for i in range(warmup + new_tokens):
        sync(device)
        t0 = time.perf_counter()
        out = model(nxt, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(nxt[0]))  # syncs, as moeserve's step does
        if i >= warmup:
            elapsed += time.perf_counter() - t0
    return elapsed / new_tokens, tokens


@torch.inference_mode()
def ours_ttft(model: Transformer, length: int) -> float:
    ids = prompts(1, length, model.config.vocab_size)[0].tolist()
    cache = make_cache(model, [length + 1], BLOCK_SIZE)
    seq = cache.new_sequence()
    seq.reserve(cache.allocator, length)
    sync(model.device)
    t0 = time.perf_counter()
    batch = ForwardBatch.build([SequenceStep(ids, 0, seq.blocks)], BLOCK_SIZE, model.device)
    int(model(batch, cache).argmax(-1)[0])
    return time.perf_counter() - t0


@torch.inference_mode()
def hf_ttft(model: torch.nn.Module, length: int, vocab: int) -> float:
    device = next(model.parameters()).device
    ids = prompts(1, length, vocab).to(device)
    sync(device)
    t0 = time.perf_counter()
    int(model(ids, use_cache=True).logits[0, -1].argmax())
    return time.perf_counter() - t0


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy (read + write), best of 10; on the CPU a 1 GiB sum (read)."""
    if device.type != "cuda":
        x = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
        best = min(_timed(lambda: x.sum(), device) for _ in range(5))
        return x.numel() * 4 / best
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src), device) for _ in range(10))
    return 2 * src.numel() / best


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def peak_reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = torch.bfloat16
    batches = [int(b) for b in args.batches.split(",")]
    raw = PRESETS[args.preset]
    work = Path(tempfile.mkdtemp(prefix="moeserve-bench-"))
    (work / "config.json").write_text(json.dumps({**raw, "torch_dtype": "bfloat16"}))
    result: dict[str, Any] = {"preset": args.preset, "device": str(device), "dtype": "bfloat16"}
    result["cuda_graphs"] = device.type == "cuda"  # elsewhere "graphs" runs the static step uncaptured
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    t0 = time.perf_counter()
    hf = build_hf(work, device, dtype, args.seed)
    reader = MemoryReader(dict(hf.state_dict()), raw["n_routed_experts"])
    max_context = max(args.prompt + args.new_tokens + 8, args.ttft_prompt + 8)
    ours = load_model(work, dtype, reader=reader, max_positions=max_context, device=device)  # type: ignore[arg-type]
    result["load_seconds"] = time.perf_counter() - t0
    check = prompts(1, 32, raw["vocab_size"])
    with torch.inference_mode():
        ref = hf(check.to(device)).logits[0].float()
        cache = make_cache(ours, [32], BLOCK_SIZE)
        seq = cache.new_sequence()
        seq.reserve(cache.allocator, 32)
        got = ours(ForwardBatch.build([SequenceStep(check[0].tolist(), 0, seq.blocks)], BLOCK_SIZE, device),
                   cache, all_logits=True)  # fmt: skip
    result["logits_max_rel_diff_vs_transformers"] = float((got - ref).abs().max() / ref.abs().max())
    del reader, hf, ref, got, cache
    weight_bytes = active_weight_bytes(ours.config, ours)
    bandwidth = copy_bandwidth(device)
    decode: dict[int, dict[str, Any]] = {b: {"batch": b} for b in batches}

    peak_reset(device)
    modes: dict[str, StepFactory] = {
        "moeserve_graphs": graph_step(ours, max(batches), max_context),
        "moeserve_eager": eager_step(ours),
    }
    ours_decode(ours, eager_step(ours), prompts(2, 16, raw["vocab_size"]), 2)  # one-off set-up out of the way
    for mode, step in modes.items():
        for b in batches:
            seconds, _ = ours_decode(ours, step, prompts(b, args.prompt, raw["vocab_size"]), args.new_tokens)
            decode[b][f"{mode}_tok_s"] = b / seconds
            print(f"  {mode:>16} batch {b:>3}: {b / seconds:10.1f} tok/s", flush=True)
    ours_ttft(ours, min(256, args.ttft_prompt))  # warm the prefill kernels
    ttft = {"prompt_tokens": args.ttft_prompt, "moeserve_s": ours_ttft(ours, args.ttft_prompt)}
    peak = {"moeserve_bytes": peak_bytes(device)}
    config = ours.config
    del ours, modes
    peak_reset(device)

    hf = build_hf(work, device, dtype, args.seed)
    hf_decode(hf, prompts(2, 16, raw["vocab_size"]), 2)
    for b in batches:
        seconds, _ = hf_decode(hf, prompts(b, args.prompt, raw["vocab_size"]), args.new_tokens)
        decode[b]["transformers_tok_s"] = b / seconds
        print(f"  {'transformers':>16} batch {b:>3}: {b / seconds:10.1f} tok/s", flush=True)
    hf_ttft(hf, min(256, args.ttft_prompt), raw["vocab_size"])
    ttft["transformers_s"] = hf_ttft(hf, args.ttft_prompt, raw["vocab_size"])
    peak["transformers_bytes"] = peak_bytes(device)
    del hf
    peak_reset(device)

    for row in decode.values():
        hf_rate = row["transformers_tok_s"]
        for mode in ("moeserve_graphs", "moeserve_eager"):
            rate = row[f"{mode}_tok_s"]
            row[f"{mode}_vs_transformers"] = rate / hf_rate if rate is not None else None
        graphs, eager = row["moeserve_graphs_tok_s"], row["moeserve_eager_tok_s"]
        row["graphs_vs_eager"] = graphs / eager if graphs is not None else None
    roofline = bandwidth / weight_bytes
    b1 = decode.get(1, {})
    best_b1 = b1.get("moeserve_graphs_tok_s") or b1.get("moeserve_eager_tok_s")
    result.update(
        decode=list(decode.values()),
        roofline={
            "active_weight_bytes_per_token": weight_bytes,
            "copy_bandwidth_bytes_per_s": bandwidth,
            "roofline_tok_s": roofline,
            "batch1_fraction": best_b1 / roofline if best_b1 else None,
        },
        ttft=ttft,
        peak_memory=peak,
        config={
            "layers": config.num_hidden_layers,
            "routed_experts": config.n_routed_experts,
            "top_k": config.num_experts_per_tok,
            "hidden": config.hidden_size,
        },  # fmt: skip
    )
    result["targets"] = targets(result)
    return result


def targets(result: dict[str, Any]) -> dict[str, bool | None]:
    """The issue's GPU targets, met or not (None: not measured)."""
    rows = {row["batch"]: row for row in result["decode"]}

    def at_least(value: float | None, bound: float) -> bool | None:
        return None if value is None else value >= bound

    b1, b64 = rows.get(1, {}), rows.get(64, {})
    best = b1.get("moeserve_graphs_vs_transformers") or b1.get("moeserve_eager_vs_transformers")
    best64 = b64.get("moeserve_graphs_vs_transformers") or b64.get("moeserve_eager_vs_transformers")
    return {
        "batch1_roofline_>=_50%": at_least(result["roofline"]["batch1_fraction"], 0.5),
        "batch1_>=_5x_transformers": at_least(best, 5.0),
        "batch64_>=_10x_transformers": at_least(best64, 10.0),
        "graphs_>=_2x_eager_at_batch1": at_least(b1.get("graphs_vs_eager"), 2.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="v2-lite", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--ttft-prompt", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = run(args)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
