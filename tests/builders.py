"""Small builders for test objects: reference checkpoints made with `transformers`.

The reference model is the oracle, so these checkpoints are written by `transformers` itself
(`save_pretrained`), never by moeserve's own writer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moeserve.workers.model.batch import ForwardBatch, SequenceStep
from moeserve.workers.offline.generate import make_cache

if TYPE_CHECKING:
    from moeserve.workers.model.config import ModelConfig
    from moeserve.workers.model.transformer import Transformer

COMMON: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=1024,
)

# name -> (transformers config class name, kwargs)
REFERENCE_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    # V2-Lite-like: no query compression, greedy routing
    "v2_lite": ("DeepseekV2", dict(COMMON, q_lora_rank=None, n_shared_experts=2, first_k_dense_replace=1)),
    # V2-like: query LoRA, group-limited routing, big routed scaling, YaRN
    "v2": (
        "DeepseekV2",
        dict(
            COMMON,
            q_lora_rank=24,
            n_shared_experts=2,
            first_k_dense_replace=1,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=16.0,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=4.0,
                original_max_position_embeddings=128,
                beta_fast=32,
                beta_slow=1,
                mscale=0.707,
                mscale_all_dim=0.707,
            ),
        ),
    ),
    # V3-like: noaux_tc with a correction bias, sigmoid scores, normalised top-k, two dense layers
    "v3": (
        "DeepseekV3",
        dict(
            COMMON,
            num_hidden_layers=4,
            q_lora_rank=24,
            n_shared_experts=1,
            first_k_dense_replace=2,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        ),
    ),
}


def prefill_logits(model: Transformer, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits [T, V] (fp32) of every prompt position, from one prefill on the model's device."""
    cache = make_cache(model, [len(ids)], block_size)
    seq = cache.new_sequence()
    seq.reserve(cache.allocator, len(ids))
    batch = ForwardBatch.build([SequenceStep(ids, 0, seq.blocks)], block_size, model.device)
    return model(batch, cache, all_logits=True)


def reference_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A transformers DeepseekV2/V3ForCausalLM with weights drawn wider than the default init."""
    import transformers

    family, kwargs = REFERENCE_CONFIGS[name]
    config = getattr(transformers, f"{family}Config")(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.05)
        for bname, b in model.named_buffers():
            if "e_score_correction_bias" in bname:
                b.normal_(0.0, 0.05)
    return model.eval()


def write_reference_checkpoint(name: str, out: Path, max_shard_size: str | None = None) -> Path:
    model = reference_model(name)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out


def write_bf16_reference_checkpoint(name: str, out: Path) -> tuple[Path, torch.nn.Module]:
    """A bf16 checkpoint of `reference_model(name)` and the fp32 reference holding exactly its
    values (weights rounded to bf16 in place: rope buffers and the computation stay fp32)."""
    import copy

    model = reference_model(name)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(out)
    return out, model


# A text corpus with multi-byte characters, so the tokenizer has tokens that split them.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. ",
    "Mixture-of-experts models route every token to a few experts. ",
    "Grüße aus Köln: schöne Bäume und Äpfel. ",
    "日本語のテキストと中文文本混合在一起。",
    "Emoji: 🙂🚀🎉 café naïve façade — “quotes” € ₿ ",
    "Латиница и кириллица: привет, мир! ",
]
SERVING_VOCAB = 384
BOS, EOS = "<|bos|>", "<|eos|>"


def train_byte_level_tokenizer(vocab_size: int = SERVING_VOCAB) -> object:
    """A byte-level BPE `tokenizers.Tokenizer` (ids 0, 1 = BOS, EOS) trained on CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


def write_serving_checkpoint(out: Path, seed: int = 0) -> Path:
    """A small DeepSeek-V2 checkpoint (written by transformers) plus a byte-level BPE tokenizer.json."""
    import transformers

    kwargs = dict(
        COMMON,
        vocab_size=SERVING_VOCAB,
        q_lora_rank=None,
        n_shared_experts=1,
        first_k_dense_replace=1,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    model = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.05)
    model.eval().save_pretrained(out)
    train_byte_level_tokenizer().save(str(out / "tokenizer.json"))  # type: ignore[attr-defined]
    return out


def write_scripted_checkpoint(src: Path, out: Path, chain: list[int]) -> Path:
    """A copy of checkpoint `src` rewired into a bigram machine: after token chain[i] it greedily
    emits chain[i + 1] (whatever the context), so tests know the exact text it will stream.

    Every attention and feed-forward output projection is zeroed, so the residual stream is the
    token's embedding; embedding row chain[i] is a scaled basis vector e_i and head row chain[i + 1]
    points along e_i. The chain's ids must be distinct and fewer than the hidden size.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    if len(set(chain)) != len(chain):
        raise ValueError(f"chain ids must be distinct: {chain}")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    tensors = load_file(str(src / "model.safetensors"))
    for name, t in tensors.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            t.zero_()
        elif name == "model.norm.weight":
            t.fill_(1.0)
    embed, head = tensors["model.embed_tokens.weight"], tensors["lm_head.weight"]
    if len(chain) > embed.shape[1]:
        raise ValueError(f"chain longer than the hidden size {embed.shape[1]}")
    for i, (a, b) in enumerate(zip(chain, chain[1:], strict=False)):
        embed[a].zero_()
        embed[a, i] = 1.0
        head[b, i] = 10.0
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


class ChecksumRunner:
    """A ModelRunner without a model: the next token is a checksum of the whole context, which it
    reads back from its own paged token store through each sequence's block table. Any paging bug
    (a block shared, freed early, or a wrong slot) changes the tokens; `reference` gives the truth.
    """

    def __init__(self, num_blocks: int, block_size: int = 4, vocab_size: int = 101, max_positions: int = 512):
        from moeserve.workers.model.kv_cache import BlockAllocator

        self._allocator = BlockAllocator(num_blocks)
        self._block_size = block_size
        self._vocab_size = vocab_size
        self._max_positions = max_positions
        self.store = [-1] * (num_blocks * block_size)  # token id per cache slot
        self.step_tokens: list[int] = []  # tokens fed per step
        self.fail_after: int | None = None  # raise on the step after this many steps

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def allocator(self) -> Any:
        return self._allocator

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def max_positions(self) -> int:
        return self._max_positions

    def next_token(self, context: list[int]) -> int:
        return (sum((i + 1) * t for i, t in enumerate(context)) * 31 + len(context)) % self._vocab_size

    def reference(self, prompt: list[int], max_tokens: int) -> list[int]:
        context, out = list(prompt), []
        for _ in range(max_tokens):
            out.append(self.next_token(context))
            context.append(out[-1])
        return out

    def step(self, steps: list[Any]) -> torch.Tensor:
        if self.fail_after is not None and len(self.step_tokens) >= self.fail_after:
            raise RuntimeError("injected step failure")
        self.step_tokens.append(sum(len(s.new_token_ids) for s in steps))
        bs = self._block_size
        logits = torch.zeros(len(steps), self._vocab_size)
        for row, s in enumerate(steps):
            for i, token in enumerate(s.new_token_ids):
                pos = s.cached + i
                self.store[s.block_table[pos // bs] * bs + pos % bs] = token
            end = s.cached + len(s.new_token_ids)
            context = [self.store[s.block_table[p // bs] * bs + p % bs] for p in range(end)]
            logits[row, self.next_token(context)] = 8.0
        return logits


def tiny_config(**overrides: Any) -> ModelConfig:
    """A parsed config small enough for router and placement unit tests (no weights)."""
    from moeserve.workers.model.config import ModelConfig

    base: dict[str, Any] = dict(
        model_type="deepseek_v2",
        vocab_size=8,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        kv_lora_rank=8,
        qk_nope_head_dim=4,
        qk_rope_head_dim=4,
        v_head_dim=4,
        intermediate_size=8,
        n_routed_experts=8,
        num_experts_per_tok=2,
    )
    return ModelConfig.from_dict({**base, **overrides})
