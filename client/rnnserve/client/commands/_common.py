"""What the user commands share: the server options and turning failures into one line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ..errors import RnnserveError
from ..options import ClientOptions, RetryPolicy

#: Where the commands look for a server unless told otherwise.
DEFAULT_SERVER = "127.0.0.1:50051"


class CommandError(Exception):
    """Bad input to a command (a file, a column, a model of the wrong kind): one line to print."""


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """``--server HOST:PORT`` and ``--timeout SECONDS``."""
    parser.add_argument(
        "--server",
        default=DEFAULT_SERVER,
        metavar="HOST:PORT",
        help=f"the rnnserve server (default {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long to keep trying to reach the server (default 5)",
    )


def client_options(args: argparse.Namespace) -> ClientOptions:
    """Client options from ``--server`` / ``--timeout``: a down server fails within the timeout."""
    timeout = max(0.1, float(args.timeout))
    retry = RetryPolicy(
        initial_backoff_s=0.05, max_backoff_s=min(1.0, timeout), give_up_after_s=timeout
    )
    return ClientOptions(target=args.server, deadline_s=max(timeout, 10.0), retry=retry)


def run_command(name: str, body: Callable[[], int]) -> int:
    """Run a command body; SDK errors and bad input become one line on stderr and exit 1."""
    try:
        return body()
    except RnnserveError as exc:
        print(f"rnnserve {name}: {exc.message}", file=sys.stderr)
    except CommandError as exc:
        print(f"rnnserve {name}: {exc}", file=sys.stderr)
    except BrokenPipeError:
        # The reader went away (for example `| head`): not an error worth a message.
        sys.stderr.close()
        return 0
    return 1
