"""Regenerate kiln's gRPC Python code from kiln/proto/inference.proto.

    python scripts/gen_proto.py            # into the repository (kiln/proto/inference_pb2*.py, .pyi)
    python scripts/gen_proto.py --out DIR  # into DIR/kiln/proto/ (the staleness test compares the two)

protoc runs from the repository root with `-I .`, so the generated gRPC module imports
`from kiln.proto import inference_pb2`, which resolves inside our package (with `-I kiln/proto` it would be
`from kiln.v1 import ...`, which the real `kiln` package would shadow).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "kiln/proto/inference.proto"


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--python_out={out}",
           f"--grpc_python_out={out}", f"--pyi_out={out}", PROTO]
    subprocess.run(cmd, cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    generate(p.parse_args(argv).out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
