"""A second test environment: rnnserve on the oldest protobuf and grpcio it declares.

``make test`` runs the whole suite on the newest releases pip picks; ``make test-compat``
(``nox -s lowest``) installs rnnserve with protobuf and grpcio pinned to the floors in
pyproject.toml and runs a representative part of the suite there (the wire codec, the engine
and batcher, both SDKs, server parity), then adds the unmodified ``tritonclient[grpc]`` from
PyPI (which needs protobuf 6: < 7) and runs the Open Inference Protocol tests with it.
"""

from __future__ import annotations

import nox

#: The floors in pyproject.toml; the generated code (make proto) runs on nothing older.
PROTOBUF_FLOOR = "protobuf==6.30.0"
GRPCIO_FLOOR = "grpcio==1.72.1"
#: Triton's client as a Triton user installs it (its newest release at the time of writing).
TRITONCLIENT = "tritonclient[grpc]==2.73.0"
#: What the tests import besides rnnserve (conftest loads tests.support.procs, which reads YAML).
TEST_TOOLS = ("pytest>=8", "pytest-asyncio>=0.23", "pytest-timeout>=2.3", "pyyaml>=6")

#: Tests that need neither torch nor a training run: what the floors could break.
SUBSET = (
    "tests/unit/test_wire.py",
    "tests/unit/test_manifest.py",
    "tests/unit/test_state.py",
    "tests/unit/test_engine.py",
    "tests/unit/test_batcher.py",
    "tests/unit/test_metrics.py",
    "tests/unit/test_client_convert.py",
    "tests/unit/test_client_errors.py",
    "tests/unit/test_client_ledger.py",
    "tests/integration/test_client_sync.py",
    "tests/integration/test_client_async.py",
    "tests/integration/test_server_parity.py",
)

# uv installs the environment several times faster than pip (no bytecode compiling, parallel
# downloads); plain venv + pip where uv is missing.
nox.options.default_venv_backend = "uv|venv"
nox.options.reuse_existing_virtualenvs = True
#: Under .venv (ignored by git, removed by make clean) rather than a .nox folder of its own.
nox.options.envdir = ".venv/nox"


@nox.session
def lowest(session: nox.Session) -> None:
    """The floors, then tritonclient beside them. Arguments after ``--`` go to both pytest
    runs (``nox -s lowest -- -x``)."""
    session.install("-e", ".", PROTOBUF_FLOOR, GRPCIO_FLOOR, *TEST_TOOLS)
    session.run("python", "-c", _SHOW_VERSIONS)
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUBSET, *session.posargs)
    # tritonclient needs a newer grpcio than rnnserve's floor, and its generated code (protoc
    # 33.5) needs protobuf 6.33.5 at run time, though it declares >= 6.30.0: the newest 6.x.
    session.install(TRITONCLIENT, "protobuf>=6.33.5,<7")
    session.run("python", "-c", _SHOW_VERSIONS)
    oip = _oip_tests()
    if oip:
        session.run(
            "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *oip, *session.posargs
        )


_SHOW_VERSIONS = (
    "import google.protobuf, grpc; "
    "print('protobuf', google.protobuf.__version__, 'grpcio', grpc.__version__)"
)


def _oip_tests() -> list[str]:
    from pathlib import Path

    return sorted(str(p) for p in Path("tests").glob("*/test_oip*.py"))
