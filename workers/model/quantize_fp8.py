"""Write an FP8 block-scaled checkpoint from a bf16/fp32 one, in DeepSeek-V3's published format.

What DeepSeek-V3 quantizes: the linear projections of attention (`q_proj` / `q_a_proj`, `q_b_proj`,
`kv_a_proj_with_mqa`, `kv_b_proj`, `o_proj`) and of the dense MLPs, shared experts and routed
experts (`gate_proj`, `up_proj`, `down_proj`), in every decoder layer including the MTP layer's
block; each becomes `float8_e4m3fn` beside `<name>_scale_inv`, fp32 [ceil(N/128), ceil(K/128)].
Everything else keeps its dtype: embeddings, norms, `lm_head`, the router (`mlp.gate`, its
`e_score_correction_bias`), and the MTP layer's `eh_proj` and `shared_head`. config.json gains
`quantization_config`; the shards keep their names (an index maps each scale to its weight's shard)
and the other files (tokenizer...) are copied. This module writes files; it runs no model.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from moeserve.workers.model import fp8
from moeserve.workers.model.config import ConfigError, Fp8Quantization

QUANTIZED = re.compile(
    r"^model\.layers\.\d+\."
    r"(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight$"
)
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"


def is_quantized(name: str) -> bool:
    """Whether DeepSeek-V3's published checkpoint stores tensor `name` as fp8 blocks."""
    return QUANTIZED.match(name) is not None


def quantize_checkpoint(src: str | Path, out: str | Path, block: tuple[int, int] = (128, 128)) -> Path:
    """Quantize checkpoint directory `src` into `out` (created; must not hold a checkpoint yet)."""
    src, out = Path(src), Path(out)
    config_path = src / "config.json"
    if not config_path.exists():
        raise ConfigError(f"no config.json in {src}")
    raw = json.loads(config_path.read_text())
    if raw.get("quantization_config") is not None:
        raise ConfigError(f"{src} is already quantized (config.json has a quantization_config)")
    if (src / INDEX).exists():
        index = json.loads((src / INDEX).read_text())
        shards = sorted(set(index["weight_map"].values()))
    elif (src / SINGLE).exists():
        index, shards = None, [SINGLE]
    else:
        raise ConfigError(f"no {SINGLE} or {INDEX} in {src}")
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for shard in shards:
        tensors = {}
        with safe_open(str(src / shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                tensor = f.get_tensor(name)
                if is_quantized(name):
                    q = fp8.quantize(tensor, block)
                    tensors[name], tensors[name + SCALE_SUFFIX] = q.weight, q.scale_inv
                else:
                    tensors[name] = tensor.contiguous()
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if index is not None:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    quantization = Fp8Quantization(weight_block_size=block)
    (out / "config.json").write_text(
        json.dumps({**raw, "quantization_config": quantization.to_dict()}, indent=2)
    )
    for other in src.iterdir():
        if other.is_file() and other.name not in {"config.json", INDEX, *shards}:
            shutil.copy(other, out / other.name)
    return out
