"""Regenerate the Python gRPC code of the `moeserve.v1` protos: `python -m moeserve.v1.codegen`.

Writes `<name>_pb2.py`, `<name>_pb2_grpc.py` and `<name>_pb2.pyi` next to each `.proto` in this
directory (or under `--out`, which the no-diff test uses). Needs `grpcio-tools` (a dev dependency);
nothing imports this module at run time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parents[1]  # the directory holding `moeserve/`, so imports read `moeserve.v1...`


def proto_files() -> list[Path]:
    return sorted(HERE.glob("*.proto"))


def generate(out: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc over every proto here; returns the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    include = Path(grpc_tools.__file__).parent / "_proto"
    sources = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    rel = HERE.relative_to(PROTO_ROOT)
    return sorted(
        out / rel / f"{p.stem}{suffix}"
        for p in proto_files()
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeserve.v1.codegen", description=__doc__)
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root (default: in place)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
