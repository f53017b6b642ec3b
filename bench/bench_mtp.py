"""MTP speculative decoding benchmark: decode tok/s with and without `--speculative mtp`, same run.

Runs the serving engine in this process (greedy, `ignore_eos`) on N prompts at once (batch 1 and
16 by default), once plainly and once per K in `--k`, and prints decode tokens/s (prefill steps
excluded: the clock starts once every request has its first token), the ratio to plain decoding,
and the acceptance rate of the drafts by position. Greedy outputs are checked to be identical.

Models: the embedded default model (with its trained MTP layer; prompts are Python source from the
standard library, what it was trained on) and `--bench-model`, the `bench` preset with a random MTP
layer (drafts are almost never accepted: the cost of speculation without its gain).

    python bench/bench_mtp.py [--batches 1,16] [--k 1,2,3] [--new-tokens 64] [--threads 2] [--bench-model]
"""

from __future__ import annotations

import argparse
import platform
import sysconfig
import time
from pathlib import Path

import torch

from moeserve.engine_settings import EngineSettings
from moeserve.workers.engine import Engine, LocalModelRunner, RequestOutput, SamplingParams
from moeserve.workers.model.loader import EMBEDDED_MODEL_PATH, load_model
from moeserve.workers.model.mtp import MTPLayer, load_mtp
from moeserve.workers.model.random_checkpoint import PRESETS, write_random_checkpoint
from moeserve.workers.model.tokenizer import Tokenizer
from moeserve.workers.model.transformer import Transformer

BENCH_MTP_DIR = Path.home() / ".cache" / "moeserve" / "bench-model-mtp"


def bench_mtp_checkpoint() -> Path:
    if not (BENCH_MTP_DIR / "model.safetensors").exists():
        raw = {**PRESETS["bench"], "num_nextn_predict_layers": 1}
        write_random_checkpoint(BENCH_MTP_DIR, raw, torch.bfloat16, seed=0, std=0.02)
    return BENCH_MTP_DIR


def python_prompts(path: Path, batch: int, length: int) -> list[list[int]]:
    """`batch` windows of `length` tokens from stdlib sources (the embedded model's kind of text)."""
    tok = Tokenizer.from_model_dir(path)
    assert tok is not None
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))[::7]
    out = []
    for f in files:
        ids = tok.encode(f.read_text(errors="replace"))
        if len(ids) > length:
            out.append(ids[:length])
        if len(out) == batch:
            return out
    raise SystemExit("not enough stdlib files for the prompts")


def random_prompts(vocab: int, batch: int, length: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(batch)
    return torch.randint(2, vocab, (batch, length), generator=gen).tolist()


def run(
    model: Transformer, mtp: MTPLayer | None, prompts: list[list[int]], new_tokens: int, k: int
) -> tuple[list[list[int]], float, list[float]]:
    """Outputs, decode tokens/s, and acceptance rate per draft position."""
    settings = EngineSettings(
        kv_cache_tokens=(max(map(len, prompts)) + new_tokens + 8) * len(prompts) + 64 * len(prompts),
        max_num_seqs=len(prompts),
        speculative="mtp" if mtp is not None else None,
        num_speculative_tokens=k,
        prefix_caching=False,
    )
    runner = LocalModelRunner(model, settings.num_blocks, settings.block_size, mtp=mtp)
    engine = Engine(runner, settings)
    outputs: list[list[int]] = [[] for _ in prompts]
    for i, prompt in enumerate(prompts):

        def sink(out: RequestOutput, i: int = i) -> None:
            outputs[i].extend(out.token_ids)

        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        engine.add(engine.make_request(prompt, params, sink))
    while not all(outputs):  # prefill (and the first token of each request)
        engine.step()
    first = sum(map(len, outputs))
    t0 = time.perf_counter()
    while engine.has_work:
        engine.step()
    seconds = time.perf_counter() - t0
    rates = []
    if engine.speculator is not None:
        stats = engine.speculator.stats
        rates = [stats.acceptance_rate(i) for i in range(k)]
    return outputs, (sum(map(len, outputs)) - first) / seconds, rates


def bench(name: str, path: Path, prompts_of, batches: list[int], ks: list[int], new_tokens: int) -> None:  # noqa: ANN001
    model = load_model(path, torch.bfloat16)
    mtp = load_mtp(path, model)
    model.prepare_decode()
    print(f"\n{name}: {path} (bf16)")
    print(f"{'batch':>5} {'K':>3} {'decode tok/s':>13} {'vs plain':>9}  acceptance by position")
    for batch in batches:
        prompts = prompts_of(batch)
        run(model, None, prompts[:1], 4, 1)  # warm-up
        plain, plain_rate, _ = run(model, None, prompts, new_tokens, 1)
        print(f"{batch:>5} {'-':>3} {plain_rate:>13.1f} {1.0:>9.2f}")
        for k in ks:
            out, rate, acc = run(model, mtp, prompts, new_tokens, k)
            same = "identical" if out == plain else "DIFFERENT OUTPUT"
            accs = " ".join(f"{a:.2f}" for a in acc)
            print(f"{batch:>5} {k:>3} {rate:>13.1f} {rate / plain_rate:>9.2f}  {accs}  ({same})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,16")
    p.add_argument("--k", default="1,2,3")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bench-model", action="store_true", help="also the bench preset with a random MTP layer")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    ks = [int(k) for k in args.k.split(",")]
    print(
        f"torch {torch.__version__}, {args.threads} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{platform.processor() or platform.machine()}"
    )
    bench(
        "embedded default model",
        EMBEDDED_MODEL_PATH,
        lambda b: python_prompts(EMBEDDED_MODEL_PATH, b, args.prompt_tokens),
        batches,
        ks,
        args.new_tokens,
    )
    if args.bench_model:
        path = bench_mtp_checkpoint()
        vocab = PRESETS["bench"]["vocab_size"]
        bench(
            "bench model",
            path,
            lambda b: random_prompts(vocab, b, args.prompt_tokens),
            batches,
            ks,
            args.new_tokens,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
