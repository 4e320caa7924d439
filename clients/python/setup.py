"""Generates the gRPC stubs from the repository's proto files while the
package is built: `build_py` runs grpcio-tools' protoc over
`../../proto/agentplane/v1/*.proto` (or `$AGENTPLANE_PROTO_DIR`) into
`src/agentplane/v1/` and then copies the package as usual. The generated
files are not committed (see .gitignore).

Metadata lives in pyproject.toml; this file only adds the build step.
"""

import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"


def proto_root() -> Path:
    """The directory that holds `agentplane/v1/*.proto` (the protoc include root)."""
    root = Path(os.environ.get("AGENTPLANE_PROTO_DIR", HERE.parent.parent / "proto"))
    if not (root / "agentplane" / "v1").is_dir():
        raise SystemExit(
            f"agentplane: no proto files at {root}/agentplane/v1: build from a checkout "
            "of the agentplane repository (pip install ./clients/python), or set "
            "AGENTPLANE_PROTO_DIR to the repository's proto/ directory"
        )
    return root


def generate() -> None:
    """Runs protoc (from grpcio-tools) over every proto file of agentplane.v1."""
    import grpc_tools
    from grpc_tools import protoc

    root = proto_root()
    files = sorted(str(p.relative_to(root)) for p in (root / "agentplane" / "v1").glob("*.proto"))
    if not files:
        raise SystemExit(f"agentplane: no .proto files in {root}/agentplane/v1")
    # google/protobuf/{duration,timestamp}.proto ship inside grpcio-tools.
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    # The proto files import each other as "agentplane/v1/x.proto", so the
    # modules land in the package agentplane.v1 and import one another as
    # `from agentplane.v1 import x_pb2`: the same path once installed.
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{well_known}",
        f"--python_out={SRC}",
        f"--pyi_out={SRC}",
        f"--grpc_python_out={SRC}",
        *files,
    ]
    # Nothing stale from a proto file that was removed or renamed.
    out = SRC / "agentplane" / "v1"
    for pattern in ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py"):
        for old in out.glob(pattern):
            old.unlink()
    if protoc.main(args) != 0:
        raise SystemExit(f"agentplane: protoc failed on {', '.join(files)}")


class BuildPyWithStubs(build_py):
    """build_py that first regenerates the stubs from the proto files."""

    def run(self) -> None:
        generate()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
