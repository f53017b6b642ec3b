"""The one compiled part of moeserve: the CPU kernels of the AVX2 path (bf16 weights under fp32 math,
the absorbed MLA decode; workers/kernels/csrc/avx2_kernels.c). Everything else is in pyproject.toml.

It is optional: where no C compiler is found, the build warns and moeserve runs without it
(`moeserve.workers.kernels.avx2.available()` is False: fp32 weights and torch's attention instead).
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
            print(f"avx2_kernels: building with OpenMP failed ({error}); building it single-threaded")
            ext.extra_compile_args = [a for a in ext.extra_compile_args if a not in OPENMP]
            ext.extra_link_args = [a for a in ext.extra_link_args if a not in OPENMP]
            super().build_extension(ext)


setup(
    ext_modules=[
        Extension(
            "moeserve.workers.kernels._avx2_kernels",
            sources=["workers/kernels/csrc/avx2_kernels.c"],
            extra_compile_args=["-O3", *OPENMP],
            extra_link_args=OPENMP,
            optional=True,
        )
    ],
    cmdclass={"build_ext": OptionalOpenMPBuild},
)
