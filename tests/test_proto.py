"""proto/: the committed generated modules are exactly what proto/generate.py makes, and import without torch."""

import subprocess
import sys
from pathlib import Path

from noprop.proto import generate, inference_pb2


def test_generated_modules_are_up_to_date(tmp_path):
    written = generate.generate(tmp_path)
    assert sorted(p.name for p in written) == ["inference_pb2.py", "inference_pb2_grpc.py"]
    stale = [p.name for p in written if p.read_bytes() != (generate.PROTO_ROOT / p.name).read_bytes()]
    assert not stale, f"{stale} differ from the .proto sources: run `python proto/generate.py` and commit the result"
    text = (tmp_path / "inference_pb2_grpc.py").read_text()
    assert "from noprop.proto import inference_pb2 " in text and "noprop.v1 import" not in text


def test_schema_names_and_module_paths():
    assert inference_pb2.DESCRIPTOR.package == "noprop.v1"
    assert inference_pb2.DESCRIPTOR.name == "noprop/v1/inference.proto"
    service = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
    assert sorted(m.name for m in service.methods) == ["ModelInfo", "Predict"]
    assert inference_pb2.ModelManifest.__module__ == "noprop.proto.inference_pb2"
    assert (Path(generate.__file__).parent / "noprop" / "v1" / "inference.proto").is_file()


def test_generated_modules_do_not_import_torch():
    code = ("import sys, noprop.proto.inference_pb2, noprop.proto.inference_pb2_grpc; "
            "sys.exit(1 if any(m.split('.')[0] == 'torch' for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
