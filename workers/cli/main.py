"""The `moeserve` command line: generate (offline or from a server), serve, model tools.

Bad arguments print a message naming the argument and exit with code 2; nothing else here
knows about argument parsing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moeserve.workers.cli import expert_parallel as ep_cli
from moeserve.workers.cli import experts as experts_cli
from moeserve.workers.cli import plan as plan_cli
from moeserve.workers.cli import serve as serve_cli
from moeserve.workers.cli import speculative as spec_cli
from moeserve.workers.cli.args import add_fp8_weights_argument, non_negative_float, positive_int, token_ids
from moeserve.workers.cli.dtype import resolve_dtype_or_exit
from moeserve.workers.model.loader import EMBEDDED_MODEL_PATH

if TYPE_CHECKING:
    from moeserve.workers.model.tokenizer import Tokenizer
    from moeserve.workers.model.transformer import Transformer
    from moeserve.workers.offline.generate import GenerationSettings

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_HELP = (
    "compute dtype; auto (default): the checkpoint's own where this device computes it natively, "
    "else float32 (an AVX2-only CPU widens bf16 weights at load); the choice is printed to stderr"
)


def default_model_path() -> Path:
    """The small model that ships inside the package."""
    return EMBEDDED_MODEL_PATH


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text offline (or from a server with --endpoint)")
    gen.add_argument(
        "--model", type=Path, default=None, help="checkpoint directory (default: embedded model)"
    )
    gen.add_argument("--prompt", action="append", default=[], help="prompt text; repeat for a batch")
    gen.add_argument(
        "--prompt-ids", action="append", type=token_ids, default=[], help="e.g. 1,2,3; repeatable"
    )
    gen.add_argument("--max-tokens", type=positive_int, default=32)
    gen.add_argument("--temperature", type=non_negative_float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto", help=DTYPE_HELP)
    add_fp8_weights_argument(gen)
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    gen.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    gen.add_argument(
        "--enforce-eager", action="store_true", help="on CUDA: run decode steps eagerly, without CUDA graphs"
    )
    serve_cli.add_endpoint_arguments(gen)
    spec_cli.add_arguments(gen)
    serve_cli.add_serve_parser(sub, ["auto", *sorted(DTYPES)], default_model_path())

    model = sub.add_parser("model", help="model tools")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    init = model_sub.add_parser("init-random", help="write a random-weight checkpoint from a preset")
    init.add_argument("--preset", required=True, help="tiny, bench or v2-lite")
    init.add_argument("--out", type=Path, required=True)
    init.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    init.add_argument("--seed", type=int, default=0)
    quant = model_sub.add_parser(
        "quantize-fp8",
        help="write an FP8 block-scaled checkpoint (DeepSeek-V3's format) from a bf16/fp32 one",
    )
    quant.add_argument("--in", dest="src", type=Path, required=True, help="checkpoint directory to read")
    quant.add_argument("--out", type=Path, required=True, help="directory to write (new or empty)")
    ep_cli.add_arguments(gen)
    plan_cli.add_parser(sub)
    experts_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        return _generate(parser, args)
    if args.command == "serve":
        return serve_cli.run_serve(parser, args, dict(DTYPES))
    if args.command == "plan":
        return plan_cli.run(parser, args)
    if args.command == "experts" and args.experts_command == "plot":
        return experts_cli.run(parser, args)
    if args.command == "model" and args.model_command == "init-random":
        return _init_random(parser, args)
    if args.command == "model" and args.model_command == "quantize-fp8":
        return _quantize_fp8(parser, args)
    parser.error(f"unknown command {args.command!r}")
    return 2


def _generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from moeserve.workers.model.config import ConfigError
    from moeserve.workers.model.loader import CheckpointError, load_model
    from moeserve.workers.model.tokenizer import Tokenizer
    from moeserve.workers.offline.generate import GenerationSettings, generate

    if args.endpoint:
        return serve_cli.run_remote_generate(parser, args)
    serve_cli.check_offline_arguments(parser, args)
    if bool(args.prompt) == bool(args.prompt_ids):
        parser.error("give exactly one of --prompt or --prompt-ids (each may repeat)")
    path = args.model or default_model_path()
    if not (path / "config.json").exists():
        parser.error(f"--model: no config.json in {path}")
    num_speculative = spec_cli.check(parser, args, path)
    tokenizer = Tokenizer.from_model_dir(path)
    if args.prompt and tokenizer is None:
        parser.error(f"--prompt needs a tokenizer.json in {path}; use --prompt-ids instead")
    prompts = [tokenizer.encode(p) for p in args.prompt] if tokenizer and args.prompt else args.prompt_ids
    if any(not p for p in prompts):
        parser.error("--prompt: a prompt encodes to no tokens")
    if ep_cli.requested(args):
        dtype = resolve_dtype_or_exit(parser, args.dtype, path, torch.device("cpu"))
        return _print_outputs(args, prompts, ep_cli.generate(parser, args, path, prompts, dtype), tokenizer)
    device = _device(parser, args.device)
    dtype = resolve_dtype_or_exit(parser, args.dtype, path, device)
    try:
        model = load_model(path, dtype, device=device, fp8_weights=args.fp8_weights)
    except (ConfigError, CheckpointError) as e:
        parser.error(f"--model: {e}")
    vocab = model.config.vocab_size
    if any(t >= vocab for p in prompts for t in p):
        parser.error(f"--prompt-ids: token id out of range (vocab size {vocab})")
    settings = GenerationSettings(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    if args.speculative:
        outputs = _generate_speculative(parser, path, model, prompts, settings, num_speculative)
    else:
        outputs = generate(model, prompts, settings, enforce_eager=args.enforce_eager)
    return _print_outputs(args, prompts, outputs, tokenizer)


def _generate_speculative(
    parser: argparse.ArgumentParser,
    path: Path,
    model: Transformer,
    prompts: list[list[int]],
    settings: GenerationSettings,
    num_speculative_tokens: int,
) -> list[list[int]]:
    """`--speculative mtp`: the prompts through the engine with the checkpoint's MTP layer; the
    drafts' acceptance goes to stderr."""
    from moeserve.workers.model.loader import CheckpointError
    from moeserve.workers.model.mtp import load_mtp
    from moeserve.workers.offline.speculative import generate_speculative

    try:
        mtp = load_mtp(path, model)
    except CheckpointError as e:
        parser.error(f"--speculative mtp: {e}")
    outputs, stats = generate_speculative(model, mtp, prompts, settings, num_speculative_tokens)
    rates = " ".join(f"{stats.acceptance_rate(i):.2f}" for i in range(num_speculative_tokens))
    print(
        f"speculative mtp: {stats.num_accepted}/{stats.num_proposed} drafts accepted (by position: {rates})",
        file=sys.stderr,
    )
    return outputs


def _device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device: {name!r} is not a device (cpu, cuda, cuda:N)")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: {name!r}: moeserve runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: no CUDA device is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def _print_outputs(
    args: argparse.Namespace, prompts: list[list[int]], outputs: list[list[int]], tokenizer: Tokenizer | None
) -> int:
    for prompt_text, ids in zip(args.prompt or [None] * len(prompts), outputs, strict=True):
        text = tokenizer.decode(ids) if tokenizer else None
        if args.json:
            print(json.dumps({"prompt": prompt_text, "token_ids": ids, "text": text}))
        else:
            print(text if text is not None else " ".join(map(str, ids)))
    return 0


def _init_random(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from moeserve.workers.model.random_checkpoint import PRESETS, write_random_checkpoint

    if args.preset not in PRESETS:
        parser.error(f"--preset: unknown preset {args.preset!r}; choose from {', '.join(PRESETS)}")
    out = write_random_checkpoint(args.out, PRESETS[args.preset], DTYPES[args.dtype], seed=args.seed)
    print(out)
    return 0


def _quantize_fp8(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from moeserve.workers.model.config import ConfigError
    from moeserve.workers.model.quantize_fp8 import quantize_checkpoint

    if not (args.src / "config.json").exists():
        parser.error(f"--in: no config.json in {args.src}")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        parser.error(f"--out: {args.out} exists and is not an empty directory")
    try:
        print(quantize_checkpoint(args.src, args.out))
    except ConfigError as e:
        parser.error(f"--in: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
