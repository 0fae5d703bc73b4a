"""``rnnserve serve``: serve a model repository over gRPC until SIGTERM or SIGINT.

Every setting is a flag (``--session-ttl-s 60``), an environment variable
(``RNNSERVE_SESSION_TTL_S=60``) or a key in ``--config`` (TOML or JSON); flags win over the
environment, which wins over the file.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import shutil
import signal
import sys
import types
import typing
from pathlib import Path
from typing import Any

from rnnserve.server.settings import LoopKind, Settings, SettingsError, load_settings


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def configure(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting, with the setting's docstring as its help."""
    parser.add_argument(
        "--config", type=Path, help="TOML or JSON file of settings (env: RNNSERVE_CONFIG)"
    )
    for name, field in Settings.model_fields.items():
        help_text = (field.description or "").replace("%", "%%")
        help_text += f" (env: RNNSERVE_{name.upper()}; default: {field.default})"
        annotation = field.annotation
        if annotation is bool:
            parser.add_argument(
                _flag(name), action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        kwargs: dict[str, Any] = {"default": None, "help": help_text, "dest": name}
        if typing.get_origin(annotation) is typing.Literal:
            choices = typing.get_args(annotation)
            kwargs["choices"] = choices
            if all(c == c.upper() for c in choices):
                kwargs["type"] = str.upper  # --log-level debug works too
        elif annotation in (int, float, Path):
            kwargs["type"] = annotation
        elif isinstance(annotation, types.UnionType):
            kwargs["type"] = str
        parser.add_argument(_flag(name), metavar=name.upper(), **kwargs)


def use_loop(kind: LoopKind) -> bool:
    """Install the event loop policy ``kind`` asks for; True when it is uvloop. SettingsError
    when ``uvloop`` is asked for and not installed."""
    if kind == "asyncio":
        return False
    try:
        import uvloop
    except ImportError:
        if kind == "uvloop":
            raise SettingsError(
                "setting loop: uvloop is not installed; install it (pip install uvloop) "
                "or use --loop asyncio"
            ) from None
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; 0 on a clean shutdown, 2 for bad settings, 1 when the server
    cannot start."""
    import os

    config = args.config or (
        Path(os.environ["RNNSERVE_CONFIG"]) if "RNNSERVE_CONFIG" in os.environ else None
    )
    overrides = {name: getattr(args, name, None) for name in Settings.model_fields}
    try:
        settings = load_settings(config, **overrides)
        fast = use_loop(settings.loop)
    except SettingsError as exc:
        print(f"rnnserve serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return asyncio.run(_serve(settings, fast))
    except KeyboardInterrupt:
        return 130


async def _serve(settings: Settings, uvloop: bool) -> int:
    from rnnserve.server.app import RnnServer, ServerStartError

    server = RnnServer(settings)
    try:
        port = await server.start()
    except ServerStartError as exc:
        print(f"rnnserve serve: {exc}", file=sys.stderr)
        await server.stop(0)
        return 1
    if settings.gc_threshold:
        tune_gc(settings.gc_threshold)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host = settings.host if settings.host not in ("0.0.0.0", "::") else "127.0.0.1"
    target = f"{host}:{port}"
    models = server.repository.all()
    print(
        f"rnnserve: listening on {settings.host}:{port} (gRPC)"
        + (" with uvloop" if uvloop else ""),
        flush=True,
    )
    if server.metrics_port:
        print(f"rnnserve: metrics on http://{settings.metrics_host}:{server.metrics_port}/metrics")
    if models:
        for m in models:
            print(
                f"rnnserve: serving {m.label} ({m.manifest.cell}, {m.manifest.input_kind}) "
                f"on {m.engine.provider}"
            )
    else:
        print(f"rnnserve: no model found in {settings.models} yet (it is polled for new ones)")
    print("try it:")
    print(f"  {_own_command()} models --server {target}")
    print(f"  grpcurl -plaintext {target} rnnserve.v1.InferenceService/ListModels", flush=True)
    await stop.wait()
    print("rnnserve: shutting down", flush=True)
    await server.stop(settings.shutdown_grace_s)
    return 0


def tune_gc(threshold: int) -> None:
    """Collect the youngest generation only once ``threshold`` more objects are allocated than
    freed. Process-wide: the ``serve`` command calls it, an embedding application decides for
    itself. (Nothing is ``gc.freeze``-d: a model version loaded at startup and later retired
    from the repository must stay collectable.)"""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(threshold, older, oldest)


def _own_command() -> str:
    """How the user can run this CLI again: ``rnnserve`` when it is on the PATH, else the path
    it was started by (``.venv/bin/rnnserve`` under ``make serve``)."""
    argv0 = sys.argv[0]
    if os.path.basename(argv0) != "rnnserve":
        return "rnnserve"
    found = shutil.which("rnnserve")
    if found and os.path.realpath(found) == os.path.realpath(argv0):
        return "rnnserve"
    return os.path.relpath(argv0)
