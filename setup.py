"""The one compiled part of moeserve: the CPU kernel for bf16 weights with fp32 math
(workers/kernels/csrc/widen_gemm.c). Everything else is in pyproject.toml.

It is optional: where no C compiler is found, the build warns and moeserve runs without it
(`moeserve.workers.kernels.widen_gemm.available()` is False and fp32 weights are used instead).
OpenMP is tried first (threads from the runtime torch already loads), then a single-threaded build.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP = ["-fopenmp"]


class OptionalOpenMPBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as error:  # noqa: BLE001 - any compiler failure: try once more without OpenMP
            if OPENMP[0] not in ext.extra_compile_args:
                raise
            print(f"widen_gemm: building with OpenMP failed ({error}); building it single-threaded")
            ext.extra_compile_args = [a for a in ext.extra_compile_args if a not in OPENMP]
            ext.extra_link_args = [a for a in ext.extra_link_args if a not in OPENMP]
            super().build_extension(ext)


setup(
    ext_modules=[
        Extension(
            "moeserve.workers.kernels._widen_gemm",
            sources=["workers/kernels/csrc/widen_gemm.c"],
            extra_compile_args=["-O3", *OPENMP],
            extra_link_args=OPENMP,
            optional=True,
        )
    ],
    cmdclass={"build_ext": OptionalOpenMPBuild},
)
