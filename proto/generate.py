"""Regenerate the Python modules of noprop.proto from the .proto sources, with grpcio-tools.

    python proto/generate.py            # rewrite proto/inference_pb2.py and proto/inference_pb2_grpc.py
    python proto/generate.py --out DIR  # write them into DIR instead (tests/test_proto.py compares the two)

The sources live under proto/ at their package path (noprop/v1/inference.proto, package noprop.v1), so the
descriptor pool knows them by a unique name. The generated modules are written flat into proto/, which is
the package noprop.proto; protoc names the message module after the source path (noprop.v1.inference_pb2),
so the two places that spell that module path are rewritten to noprop.proto.inference_pb2. Nothing else is
touched: the output is protoc's, byte for byte, apart from those lines.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
SOURCES = ("noprop/v1/inference.proto",)
PACKAGE = "noprop.proto"  # the import package of the generated modules


def _rewrite(text: str, source: str) -> str:
    proto_module = source.removesuffix(".proto").replace("/", ".")  # noprop.v1.inference
    proto_pkg, _, stem = proto_module.rpartition(".")
    text = text.replace(f"from {proto_pkg} import {stem}_pb2 ", f"from {PACKAGE} import {stem}_pb2 ")
    return text.replace(f"'{proto_module}_pb2'", f"'{PACKAGE}.{stem}_pb2'")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (python and grpc plugins) over SOURCES; write the modules into out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"  # google/protobuf/struct.proto
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={tmp}",
                f"--grpc_python_out={tmp}", *SOURCES]
        code = protoc.main(args)
        if code != 0:
            raise RuntimeError(f"protoc failed (exit {code}) on {', '.join(SOURCES)}")
        for source in SOURCES:
            stem = Path(source).stem
            for suffix in ("_pb2.py", "_pb2_grpc.py"):
                generated = Path(tmp) / Path(source).parent / f"{stem}{suffix}"
                target = out_dir / generated.name
                target.write_text(_rewrite(generated.read_text(), source))
                written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output folder (default: proto/)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
