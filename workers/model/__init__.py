"""The model: config, layers (MLA, MoE, norm, RoPE), the transformer, the paged latent KV cache,
the checkpoint loader and the tokenizer. A naive reference path sits beside every fast one."""
