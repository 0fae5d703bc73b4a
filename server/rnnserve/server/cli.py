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

if typing.TYPE_CHECKING:
    from rnnserve.server.app import RnnServer


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
    """Serve until SIGTERM/SIGINT; 0 on a clean shutdown, 2 for bad settings or a repository
    with no model (unless allow_empty), 1 when the server cannot start (an address in use)."""
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
    from rnnserve.server.app import NoModelError, RnnServer, ServerStartError

    server = RnnServer(settings)
    # The banner lists the models once: their load lines go to the log only at DEBUG (a model
    # that fails to load is still logged as an error).
    loads = logging.getLogger("rnnserve.server.repository")
    quiet = _AboveInfo()
    if settings.log_level != "DEBUG":
        loads.addFilter(quiet)
    try:
        port = await server.start()
    except ServerStartError as exc:
        print(f"rnnserve serve: {exc}", file=sys.stderr)
        said = logging.getLogger("rnnserve.server")  # the line above is all there is to say
        said.addFilter(quiet)
        await server.stop(0)
        said.removeFilter(quiet)
        return 2 if isinstance(exc, NoModelError) else 1
    finally:
        loads.removeFilter(quiet)
    if settings.gc_threshold:
        tune_gc(settings.gc_threshold)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(banner(server, port, uvloop), flush=True)
    await stop.wait()
    print("rnnserve: shutting down", flush=True)
    await server.stop(settings.shutdown_grace_s)
    return 0


class _AboveInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO


def banner(server: RnnServer, port: int, uvloop: bool) -> str:
    """What ``rnnserve serve`` prints once it serves: where it listens, what it serves, and two
    commands to try it, with absolute paths (it may have been started from anywhere)."""
    s = server.settings
    every = " (every interface)" if s.host in ("0.0.0.0", "::", "") else ""
    host = "127.0.0.1" if every else s.host
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = f"[{s.host}]:{port}" if ":" in s.host else f"{s.host}:{port}"
    tls, tokens = s.tls_cert is not None, bool(s.auth_tokens or s.auth_tokens_file)
    lines = [
        "rnnserve is serving",
        f"  gRPC     listening on {bound}{every}"
        + (" with TLS" if tls else "")
        + (" (with uvloop)" if uvloop else ""),
        "  metrics  "
        + (
            f"http://{s.metrics_host}:{server.metrics_port}/metrics"
            if server.metrics_port
            else "off (metrics_port -1)"
        ),
    ]
    models = server.repository.all()
    repo = s.models.resolve()
    if not models:
        every_s = (
            f"every {s.reload_interval_s:g} s" if s.reload_interval_s > 0 else "never (reload off)"
        )
        lines.append(f"  models   none yet in {repo} (looked for again {every_s})")
    else:
        lines.append(f"  models   from {repo}")
        width = max(len(m.label) for m in models)
        for m in models:
            man = m.manifest
            takes = (
                f"text, {man.input_size} symbols"
                if man.input_kind == "tokens"
                else f"{man.input_size} feature" + ("s" if man.input_size != 1 else "")
            )
            lines.append(
                f"           {m.label:<{width}}  {man.cell:<11} {takes:<17} on {m.engine.provider}"
            )
    if tls or tokens:  # the CLI's commands speak plaintext without a token
        first = "the SDK with ClientOptions (docs/client.md), or"
    else:
        first = f"{_own_command()} models --server {target}"
    grpcurl = "grpcurl " + ("-cacert CA.pem" if tls else "-plaintext")
    grpcurl += " -H 'authorization: Bearer TOKEN'" if tokens else ""
    lines += [
        f"  try it   {first}",
        f"           {grpcurl} {target} rnnserve.v1.InferenceService/ListModels",
    ]
    return "\n".join(lines)


def tune_gc(threshold: int) -> None:
    """Collect the youngest generation only once ``threshold`` more objects are allocated than
    freed. Process-wide: the ``serve`` command calls it, an embedding application decides for
    itself. (Nothing is ``gc.freeze``-d: a model version loaded at startup and later retired
    from the repository must stay collectable.)"""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(threshold, older, oldest)


def _own_command() -> str:
    """How the user can run this CLI again: ``rnnserve`` when it is on the PATH, else the path
    it was started by: relative when it lies under the current folder (``.venv/bin/rnnserve``
    under ``make serve``), absolute otherwise."""
    argv0 = sys.argv[0]
    if os.path.basename(argv0) != "rnnserve":
        return "rnnserve"
    found = shutil.which("rnnserve")
    if found and os.path.realpath(found) == os.path.realpath(argv0):
        return "rnnserve"
    relative = os.path.relpath(argv0)
    return os.path.abspath(argv0) if relative.startswith("..") else relative
