"""Train a multi-token-prediction (MTP) layer on top of a frozen checkpoint (the embedded default model).

What this is: the recipe that gave the embedded default model its MTP layer
(`model.layers.<num_hidden_layers>.*`, DeepSeek-V3's layout: `enorm`, `hnorm`, `eh_proj`, a decoder
block, `shared_head.norm`; embedding and head shared with the main model, so not stored), so
`--speculative mtp` can be shown and measured offline. The main model stays frozen, so its weights
and outputs are unchanged. The layer computes h'_i = Block(eh_proj([enorm(emb(t_{i+1})) ;
hnorm(h_i)])) from the main model's final-normed hidden state h_i and is trained to match the main
model's own next-token distribution at position i+1 (distillation: what makes drafts accepted),
on the same Python-stdlib corpus as the main model, with the shipped tokenizer.

What this is not: part of the serving path, or a general trainer. It needs `transformers`.

    python -m moeserve.workers.training.train_mtp_layer --model DIR --out DIR [--steps N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.workers.cli.args import positive_float, positive_int
from moeserve.workers.training.train_default_model import (
    build_corpus,
    cosine_lr,
    encode_stream,
    make_optimizer,
    sample_batch,
    seed_everything,
)


class HFMTPLayer(nn.Module):
    """The MTP layer in transformers' modules (its block is a one-layer DeepseekV2Model whose final
    norm is the shared head's norm), for training."""

    def __init__(self, main: Any, mtp_layer_index: int) -> None:
        from transformers import DeepseekV2Model

        super().__init__()
        cfg = main.config.__class__(**{**main.config.to_dict(), "num_hidden_layers": 1})
        cfg.first_k_dense_replace = 0 if mtp_layer_index >= main.config.first_k_dense_replace else 1
        d = int(cfg.hidden_size)
        self.block = DeepseekV2Model(cfg)
        self.block.embed_tokens = None  # type: ignore[assignment]  # the input comes from eh_proj
        self.enorm = nn.Parameter(torch.ones(d))
        self.hnorm = nn.Parameter(torch.ones(d))
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.eps = float(cfg.rms_norm_eps)
        with torch.no_grad():  # start from the main model's last layer: a head start, not a copy kept
            last = main.model.layers[-1].state_dict()
            self.block.layers[0].load_state_dict(last)
            self.block.norm.weight.copy_(main.model.norm.weight)
            self.eh_proj.weight.normal_(0.0, 0.02)
            self.eh_proj.weight[:, d:] += torch.eye(d)  # h passes through at first

    def forward(self, next_embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, D] embeddings of t_{i+1} and main hidden states h_i -> final-normed h' [B, T, D]."""
        e = F.rms_norm(next_embeds, (next_embeds.shape[-1],), self.enorm, self.eps)
        h = F.rms_norm(hidden, (hidden.shape[-1],), self.hnorm, self.eps)
        x = self.eh_proj(torch.cat([e, h], dim=-1))
        return self.block(inputs_embeds=x).last_hidden_state

    def checkpoint_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        prefix = f"model.layers.{layer}."
        out = {
            prefix + "enorm.weight": self.enorm,
            prefix + "hnorm.weight": self.hnorm,
            prefix + "eh_proj.weight": self.eh_proj.weight,
            prefix + "shared_head.norm.weight": self.block.norm.weight,
        }
        for name, t in self.block.layers[0].state_dict().items():
            if name == "mlp.experts.gate_up_proj":  # transformers fuses experts: [E, 2I, D], gate first
                for e, (gate, up) in enumerate(zip(*t.chunk(2, dim=1), strict=True)):
                    out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = gate
                    out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = up
            elif name == "mlp.experts.down_proj":  # [E, D, I]
                for e, down in enumerate(t.unbind(0)):
                    out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = down
            else:
                out[prefix + name] = t
        return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in out.items()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moeserve.workers.training.train_mtp_layer")
    p.add_argument("--model", required=True, type=Path, help="checkpoint to add an MTP layer to")
    p.add_argument(
        "--out", required=True, type=Path, help="output directory (a copy of --model plus the layer)"
    )
    p.add_argument("--steps", type=positive_int, default=700)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=1, help="1 is fastest for this size")
    p.add_argument("--corpus-mb", type=positive_float, default=8.0)
    return p.parse_args(argv)


def distill_loss(main: Any, mtp: HFMTPLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL-style soft cross-entropy to the main model's distribution one position ahead, and the
    top-1 agreement (an estimate of greedy acceptance) on batch x [B, T]."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = main.model(input_ids=x)
        hidden = out.last_hidden_state.float()  # [B, T, D] final-normed
        target = main.lm_head(hidden).float()  # [B, T, V]
    embeds = main.model.embed_tokens(x[:, 1:]).float()  # t_{i+1}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = mtp(embeds, hidden[:, :-1])  # predicts t_{i+2}
        logits = main.lm_head(h).float()  # [B, T-1, V]
    p = target[:, 1:].softmax(dim=-1)  # main model's distribution of t_{i+2}
    loss = -(p * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
    agree = (logits.argmax(-1) == target[:, 1:].argmax(-1)).float().mean()
    return loss, agree


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    from tokenizers import Tokenizer
    from transformers import DeepseekV2ForCausalLM

    main_model = DeepseekV2ForCausalLM.from_pretrained(str(args.model), dtype=torch.float32).eval()
    for p in main_model.parameters():
        p.requires_grad_(False)
    layer = main_model.config.num_hidden_layers
    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    corpus = build_corpus(Path(sysconfig.get_paths()["stdlib"]), int(args.corpus_mb * 1_000_000), args.seed)
    train_stream, val_stream = encode_stream(tok, corpus.train), encode_stream(tok, corpus.val)
    mtp = HFMTPLayer(main_model, layer).float().train()
    opt = make_optimizer(mtp, args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr, max(1, args.steps // 10))
        loss, agree = distill_loss(
            main_model, mtp, sample_batch(train_stream, args.batch_size, args.seq_len, gen)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mtp.parameters(), 1.0)
        opt.step()
        if (step + 1) % 25 == 0:
            rate = (step + 1) / (time.perf_counter() - start)
            print(
                f"step {step + 1}/{args.steps} loss {loss.item():.4f} "
                f"top-1 agree {agree.item():.3f} ({rate:.2f} steps/s)",
                flush=True,
            )
    mtp.eval()
    val_gen = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        agrees = [
            distill_loss(main_model, mtp, sample_batch(val_stream, 8, args.seq_len, val_gen))[1]
            for _ in range(4)
        ]
    val_agree = float(torch.stack(agrees).mean())
    print(f"held-out top-1 agreement with the main model one token ahead: {val_agree:.3f}", flush=True)

    from safetensors.torch import load_file, save_file

    if args.out.resolve() != args.model.resolve():
        shutil.copytree(args.model, args.out, dirs_exist_ok=True)
    tensors = load_file(str(args.out / "model.safetensors"))
    tensors = {k: v for k, v in tensors.items() if not k.startswith(f"model.layers.{layer}.")}
    tensors.update(mtp.checkpoint_tensors(layer))
    save_file(tensors, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((args.out / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    minutes = (time.perf_counter() - start) / 60
    note = (
        f"\n## MTP layer\n\n`model.layers.{layer}.*` is a multi-token-prediction layer (DeepSeek-V3 layout;"
        f" embedding and head shared with the main model) for `--speculative mtp`, trained by\n"
        f"`python -m moeserve.workers.training.train_mtp_layer --model DIR --out DIR --steps {args.steps} "
        f"--batch-size {args.batch_size} --seq-len {args.seq_len} --lr {args.lr} --seed {args.seed}`"
        f" on the frozen main model\n(distillation to its distribution one token ahead; {args.steps} steps of"
        f" {args.batch_size} x {args.seq_len} tokens, lr {args.lr}, seed {args.seed}, {minutes:.1f} min).\n"
        f"Held-out top-1 agreement with the main model one token ahead: {val_agree:.3f}.\n"
    )
    readme = args.out / "README.md"
    text = readme.read_text() if readme.exists() else ""
    readme.write_text(text.split("\n## MTP layer\n")[0] + note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
