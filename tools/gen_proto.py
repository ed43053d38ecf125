"""Regenerate fedweights/proto/ from protos/fedweights/v1/*.proto with grpcio-tools.

    python tools/gen_proto.py            # write into fedweights/proto/
    python tools/gen_proto.py --out DIR  # write elsewhere (the codegen test diffs the two)

protoc names modules after their path under protos/ (``fedweights.v1.x_pb2``); this script moves
them into the ``fedweights.proto`` package and rewrites the generated imports to match.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
PROTO_PACKAGE_DIR = PROTO_ROOT / "fedweights" / "v1"
TARGET = ROOT / "fedweights" / "proto"
HEADER = '"""Python code generated from protos/fedweights/v1/*.proto by tools/gen_proto.py (do not edit)."""\n'


def generate(out: Path) -> list[Path]:
    """Generate *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every .proto into ``out``."""
    from grpc_tools import protoc

    protos = sorted(PROTO_PACKAGE_DIR.glob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "__init__.py").write_text(HEADER)
    if not protos:
        return []
    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(p.relative_to(PROTO_ROOT)) for p in protos],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        written = []
        for path in sorted((Path(tmp) / "fedweights" / "v1").iterdir()):
            text = re.sub(r"\bfrom fedweights\.v1 import\b", "from fedweights.proto import", path.read_text())
            target = out / path.name
            target.write_text(text)
            written.append(target)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TARGET)
    args = parser.parse_args()
    if args.out == TARGET:
        for stale in TARGET.glob("*_pb2*.py*"):
            stale.unlink()
    for path in generate(args.out):
        print(path.relative_to(args.out.parent) if args.out == TARGET else path)


if __name__ == "__main__":
    sys.exit(main())
