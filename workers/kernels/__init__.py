"""Triton kernels for the CUDA path: fused routed experts and paged MLA decode.

What this package is: the kernels, their launch wrappers (shapes, tile sizes, grids) and the
alignment of (token, expert) pairs into expert-homogeneous tiles. Every wrapper takes only tensors
and static Python numbers, reads nothing back to the host and allocates outputs of static shapes,
so a decode step that calls them can be captured in a CUDA graph.
What it is not: a model. It knows no config, layer or cache object; `moe.py` and `mla.py` choose
these kernels on CUDA devices and keep their PyTorch paths on the CPU.
On CPU tensors every kernel runs through Triton's interpreter (see `runtime.py`); that is how the
tests check them against the naive references without a GPU.
"""
