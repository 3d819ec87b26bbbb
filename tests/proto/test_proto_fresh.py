"""The committed gRPC code in kiln/proto is what scripts/gen_proto.py makes from inference.proto today."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("inference_pb2.py", "inference_pb2_grpc.py", "inference_pb2.pyi")
# Lines that name the generator's version: they change with grpcio-tools, not with the schema.
_VERSION_LINE = re.compile(r"Protobuf Python Version|GRPC_GENERATED_VERSION = |^\s*\d+,\s*$|^\s*'',\s*$")


def _normalise(text: str) -> list[str]:
    return [line for line in text.splitlines() if not _VERSION_LINE.search(line)]


def test_generated_code_is_fresh(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)], check=True)
    for name in GENERATED:
        fresh = (tmp_path / "kiln" / "proto" / name).read_text()
        committed = (ROOT / "kiln" / "proto" / name).read_text()
        assert _normalise(committed) == _normalise(fresh), (
            f"kiln/proto/{name} is stale: run `python scripts/gen_proto.py` and commit the result")


def test_generated_code_imports_inside_kiln():
    from kiln.proto import inference_pb2, inference_pb2_grpc

    assert inference_pb2.DESCRIPTOR.package == "kiln.v1"
    assert "Inference" in inference_pb2.DESCRIPTOR.services_by_name
    assert "from kiln.proto import inference_pb2" in (ROOT / "kiln/proto/inference_pb2_grpc.py").read_text()
    assert hasattr(inference_pb2_grpc, "InferenceStub")
