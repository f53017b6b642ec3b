"""Train the tiny embedded default model shipped in `moeserve/workers/assets/default-model/`.

What this is: a reproducible, offline, CPU-only recipe that builds a small DeepSeek-V2-architecture
checkpoint (MLA attention without query compression, one dense layer followed by MoE layers with
shared and routed experts, greedy top-k routing) plus a byte-level BPE tokenizer, trained on the
Python standard library's own source. The result is in Hugging Face layout (`config.json`,
`model.safetensors`, `tokenizer.json`, `README.md`) so both `transformers` and moeserve's own loader
read it.

What this is not: part of the serving path (nothing imports it at run time), a general-purpose
training framework, or a model of any quality beyond "continues Python code plausibly". It needs
`transformers` (a dev dependency) and never touches the network.

    python -m moeserve.workers.training.train_default_model --out DIR [--steps N] [--seed S] [--threads T]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shlex
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moeserve.workers.cli.args import positive_float, positive_int

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedModel

BOS, EOS = "<|bos|>", "<|eos|>"
EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "encodings", "pydoc_data"})
MAX_FILE_BYTES = 150_000  # skip a few huge generated/table files; they teach little
VAL_EVERY_NTH_FILE = 20  # every 20th file (of the sorted list) is held out for validation
OUTPUT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "README.md")
MAX_DIR_BYTES = 20 * 1024 * 1024


@dataclass(frozen=True)
class Corpus:
    """Training and held-out texts, one entry per source file."""

    train: list[str]
    val: list[str]
    train_files: int
    val_files: int

    @property
    def train_bytes(self) -> int:
        return sum(len(t.encode()) for t in self.train)

    @property
    def val_bytes(self) -> int:
        return sum(len(t.encode()) for t in self.val)


# ----------------------------------------------------------------------------------------- arguments


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m moeserve.workers.training.train_default_model",
        description="Train the tiny DeepSeek-V2-architecture default model on the Python stdlib source.",
    )
    p.add_argument("--out", required=True, type=Path, help="output directory (created if absent)")
    p.add_argument("--steps", type=positive_int, default=2800, help="optimizer steps (default 2800)")
    p.add_argument("--seed", type=int, default=0, help="seed for corpus split, init and batches (default 0)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch/tokenizer CPU threads (default 1)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--vocab-size", type=positive_int, default=2048, help="BPE vocabulary (default 2048)")
    p.add_argument(
        "--corpus-mb", type=positive_float, default=8.0, help="training text cap in MB (default 8)"
    )
    p.add_argument("--log-every", type=positive_int, default=25, help="print loss every N steps (default 25)")
    p.add_argument(
        "--eval-every", type=positive_int, default=250, help="validate every N steps (default 250)"
    )
    p.add_argument(
        "--precision",
        choices=("bf16-mixed", "fp32"),
        default="bf16-mixed",
        help="bf16-mixed: fp32 weights, bf16 autocast matmuls (~1.5x faster on CPUs with bf16 units)",
    )
    args = p.parse_args(argv)
    if args.vocab_size < 256 + 2:
        p.error(f"--vocab-size must be at least 258 (256 bytes + 2 special tokens), got {args.vocab_size}")
    if args.seq_len > 1024:
        p.error(f"--seq-len must be at most max_position_embeddings (1024), got {args.seq_len}")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} exists and is not a directory")
    return args


# --------------------------------------------------------------------------------------------- corpus


def stdlib_source_files(root: Path) -> list[Path]:
    """All `.py` files under the stdlib, minus tests, IDLE, site-packages and table-like packages; sorted."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith("__pycache__")
        )
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def build_corpus(root: Path, cap_bytes: int, seed: int) -> Corpus:
    """Hold out every n-th file for validation; fill the training set to `cap_bytes` in a seeded order."""
    files = [f for f in stdlib_source_files(root) if 0 < f.stat().st_size <= MAX_FILE_BYTES]
    if not files:
        raise SystemExit(f"error: no Python source files found under {root}")
    val_files = files[::VAL_EVERY_NTH_FILE]
    train_files = [f for i, f in enumerate(files) if i % VAL_EVERY_NTH_FILE]
    random.Random(seed).shuffle(train_files)
    train: list[str] = []
    total = 0
    for f in train_files:
        text = _read_text(f)
        if text is None:
            continue
        size = len(text.encode())
        if total + size > cap_bytes:
            continue
        train.append(text)
        total += size
    val = [t for t in map(_read_text, val_files) if t is not None]
    return Corpus(train=train, val=val, train_files=len(train), val_files=len(val))


# ------------------------------------------------------------------------------------------ tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int):  # -> tokenizers.Tokenizer
    """Byte-level BPE: every UTF-8 string round-trips; `<|bos|>` is id 0 and `<|eos|>` id 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if tok.token_to_id(BOS) != 0 or tok.token_to_id(EOS) != 1:
        raise RuntimeError("special tokens did not get ids 0 and 1")
    return tok


def encode_stream(tok, texts: Sequence[str]) -> torch.Tensor:
    """Concatenate `<|bos|> text <|eos|>` for every text into one 1-D token tensor."""
    ids: list[int] = []
    for enc in tok.encode_batch(list(texts)):
        ids.append(0)
        ids.extend(enc.ids)
        ids.append(1)
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------------------------------------- model


def model_config(vocab_size: int):  # -> transformers.DeepseekV2Config
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=768,
        moe_intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=64,
        qk_rope_head_dim=16,
        qk_nope_head_dim=32,
        v_head_dim=32,
        first_k_dense_replace=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        topk_method="greedy",
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        use_cache=True,
    )


class RouterBalance:
    """Switch-style load-balancing loss over every router, collected with forward hooks."""

    def __init__(self, model: torch.nn.Module) -> None:
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

        self.terms: list[torch.Tensor] = []
        self.loads: list[torch.Tensor] = []
        self.routers = [m for m in model.modules() if isinstance(m, DeepseekV2TopkRouter)]
        for router in self.routers:
            router.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, _inputs: tuple, output: tuple) -> None:
        logits, _weights, indices = output
        n_experts = logits.shape[-1]
        probs = logits.softmax(dim=-1).mean(dim=0)
        load = torch.zeros(n_experts).index_add_(0, indices.flatten(), torch.ones(indices.numel()))
        load = load / indices.numel()
        self.loads.append(load)
        if torch.is_grad_enabled():
            self.terms.append(n_experts * (load * probs).sum())

    def take_loss(self) -> torch.Tensor:
        loss = torch.stack(self.terms).mean() if self.terms else torch.zeros(())
        self.terms.clear()
        self.loads.clear()
        return loss

    def take_loads(self) -> torch.Tensor:
        loads = torch.stack(self.loads) if self.loads else torch.zeros(0)
        self.terms.clear()
        self.loads.clear()
        return loads


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def sample_batch(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - seq_len, (batch,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model: torch.nn.Module, stream: torch.Tensor, seq_len: int, windows: int = 32) -> float:
    """Mean next-token loss over evenly spaced, fixed windows of the held-out stream."""
    model.eval()
    span = stream.numel() - seq_len
    starts = [span * i // max(1, windows - 1) for i in range(windows)]
    losses = []
    for chunk in range(0, windows, 8):
        x = torch.stack([stream[s : s + seq_len] for s in starts[chunk : chunk + 8]])
        losses.append(model(input_ids=x, labels=x).loss.float().item())
    model.train()
    return sum(losses) / len(losses)


@dataclass
class TrainResult:
    final_train_loss: float
    final_val_loss: float
    seconds: float
    expert_load: list[list[float]]


def train(
    model: torch.nn.Module,
    train_stream: torch.Tensor,
    val_stream: torch.Tensor,
    args: argparse.Namespace,
    log: Callable[[str], None] = print,
) -> TrainResult:
    balance = RouterBalance(model)
    opt = make_optimizer(model, args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    warmup = max(1, min(100, args.steps // 10))
    recent: list[float] = []
    start = time.monotonic()
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr, warmup)
        x = sample_batch(train_stream, args.batch_size, args.seq_len, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed"):
            lm_loss = model(input_ids=x, labels=x).loss
        loss = lm_loss + 0.01 * balance.take_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [lm_loss.item()])[-args.log_every :]
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            rate = done / (time.monotonic() - start)
            log(
                f"step {done}/{args.steps} loss {sum(recent) / len(recent):.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e} ({rate:.2f} steps/s)"
            )
        if done % args.eval_every == 0 and done != args.steps:
            log(f"step {done} val_loss {evaluate(model, val_stream, args.seq_len):.4f}")
            balance.take_loads()
    seconds = time.monotonic() - start
    val = evaluate(model, val_stream, args.seq_len)
    loads = balance.take_loads()
    per_layer = loads.view(-1, len(balance.routers), loads.shape[-1]).mean(0) if loads.numel() else loads
    return TrainResult(sum(recent) / len(recent), val, seconds, per_layer.tolist())


# ----------------------------------------------------------------------------------------------- save


def readme_text(
    args: argparse.Namespace,
    corpus: Corpus,
    n_params: int,
    n_tokens: int,
    result: TrainResult,
    bf16_val: float,
) -> str:
    import transformers

    command = "python -m moeserve.workers.training.train_default_model " + shlex.join(sys.argv[1:])
    loads = "\n".join(
        f"| {i + 1} | " + " ".join(f"{x:.2f}" for x in layer) + " |"
        for i, layer in enumerate(result.expert_load)
    )
    return f"""# moeserve default model

A tiny (~{n_params / 1e6:.1f}M parameter) DeepSeek-V2-architecture causal language model that ships
with moeserve so the server, tests and examples have a real checkpoint to load offline. It continues
Python code plausibly and is good for nothing else.

- Architecture: `DeepseekV2ForCausalLM`; MLA attention (4 heads, no query compression,
  kv_lora_rank 64, rope/nope/v head dims 16/32/32), hidden 256, 4 layers, the first dense and the
  other three MoE (8 routed experts, top-2 greedy routing, 1 shared expert).
- Tokenizer: byte-level BPE (`tokenizers`), vocabulary {args.vocab_size}; `<|bos|>` = 0, `<|eos|>` = 1;
  any UTF-8 text round-trips exactly. No BOS is added automatically.
- Data: the `.py` sources of the Python {sys.version.split()[0]} standard library (no tests, idlelib,
  site-packages, encodings, pydoc_data); {corpus.train_files} files / {corpus.train_bytes / 1e6:.2f} MB
  ({n_tokens:,} tokens) for training, {corpus.val_files} held-out files / {corpus.val_bytes / 1e6:.2f} MB
  for validation.
- Training: AdamW (betas 0.9/0.95, weight decay 0.1), peak lr {args.lr}, linear warmup then cosine to
  10%, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, seed {args.seed};
  {args.precision} precision on CPU ({args.threads} thread(s)), {result.seconds / 60:.1f} min;
  load-balancing loss weight 0.01.
  transformers {transformers.__version__}, torch {torch.__version__}.
- Result: final train loss {result.final_train_loss:.3f}, validation loss {result.final_val_loss:.3f}
  nats/token ({bf16_val:.3f} with the saved bfloat16 weights).

Reproduce with:

```
{command}
```

Routed-expert load on the validation windows (fraction of assignments, per MoE layer; layer 0 is dense):

| layer | experts 0-7 |
|---|---|
{loads}
"""


def save(out: Path, model: PreTrainedModel, tok: Tokenizer, readme: str) -> int:
    """Write the four files; return the directory's total size in bytes."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    (out / "generation_config.json").unlink(missing_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "README.md").write_text(readme)
    for name in OUTPUT_FILES:
        (out / name).chmod(0o644)  # save_pretrained may create files readable by the owner only
    return sum(f.stat().st_size for f in out.iterdir() if f.is_file())


# ----------------------------------------------------------------------------------------------- main


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # tokenizers' thread pool; set before first use
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false" if args.threads == 1 else "true")
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    try:
        from transformers import DeepseekV2ForCausalLM
    except ImportError as e:
        raise SystemExit(f"error: transformers with DeepSeek-V2 support is required ({e})") from e

    root = Path(sysconfig.get_paths()["stdlib"])
    corpus = build_corpus(root, int(args.corpus_mb * 1_000_000), args.seed)
    print(
        f"corpus: {corpus.train_files} train files ({corpus.train_bytes / 1e6:.2f} MB), "
        f"{corpus.val_files} val files ({corpus.val_bytes / 1e6:.2f} MB) from {root}",
        flush=True,
    )
    tok = train_tokenizer(corpus.train, args.vocab_size)
    train_stream, val_stream = encode_stream(tok, corpus.train), encode_stream(tok, corpus.val)
    print(
        f"tokenizer: vocab {tok.get_vocab_size()}; {train_stream.numel():,} train / "
        f"{val_stream.numel():,} val tokens ({corpus.train_bytes / train_stream.numel():.2f} bytes/token)",
        flush=True,
    )

    model = DeepseekV2ForCausalLM(model_config(tok.get_vocab_size())).float()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    result = train(model, train_stream, val_stream, args, log=lambda s: print(s, flush=True))

    model = model.to(torch.bfloat16)
    bf16_val = evaluate(model, val_stream, args.seq_len)
    readme = readme_text(args, corpus, n_params, train_stream.numel(), result, bf16_val)
    size = save(args.out, model, tok, readme)
    print(
        f"final train loss {result.final_train_loss:.4f} val loss {result.final_val_loss:.4f} "
        f"(bf16 {bf16_val:.4f}); {result.seconds / 60:.1f} min; wrote {args.out} ({size / 1e6:.2f} MB)"
    )
    if size > MAX_DIR_BYTES:
        print(f"error: {args.out} is {size} bytes, over the {MAX_DIR_BYTES} byte budget", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
