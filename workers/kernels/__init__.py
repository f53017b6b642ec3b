"""Triton kernels for the CUDA path: fused routed experts and paged MLA decode.

What this package is: the kernels, their launch wrappers (shapes, tile sizes, grids) and the
alignment of (token, expert) pairs into expert-homogeneous tiles. Every wrapper takes only tensors
and static Python numbers, reads nothing back to the host and allocates outputs of static shapes,
so a decode step that calls them can be captured in a CUDA graph.
Each kernel also has a torch form with the same static shapes (`fused_moe_torch`,
`paged_mla_decode_torch`) for devices without the kernels; `*_for(device)` picks one.
What it is not: a model. It knows no config, layer or cache object; the model's MoE and MLA modules
choose these kernels on CUDA devices and keep their fastest PyTorch paths on the CPU.
Triton is imported only when a kernel launches. On CPU tensors the kernels run only under Triton's
interpreter (`TRITON_INTERPRET=1` from the process's start; see `runtime.py`): that is how the tests
check them against the naive references without a GPU.
"""
