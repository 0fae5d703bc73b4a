"""``rnnserve generate``: stream text from a char model, printing characters as they come.

The prompt goes in as one chunk; then each sampled character is fed back as the next step, all
over one bidi stream, and printed (flushed) the moment it is sampled.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from .._convert import encode_inputs
from ..client import Client
from ._common import CommandError, add_server_options, client_options, run_command


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rnnserve generate``."""
    parser.add_argument("--model", required=True, help="a text (char) model, e.g. char-gru")
    parser.add_argument(
        "--prompt",
        default="",
        help="text the model reads before it writes (at least one character of its vocabulary)",
    )
    parser.add_argument("--length", type=int, default=300, help="characters to generate")
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        help="sampling temperature; 0 always picks the likeliest character (default 0.8)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed, for repeatable text")
    parser.add_argument("--version", default="", help="model version (default: the latest)")
    add_server_options(parser)


def sample(logits: npt.NDArray[np.generic], temperature: float, rng: np.random.Generator) -> int:
    """A token id drawn from softmax(logits / temperature); argmax when temperature is 0."""
    z = np.asarray(logits, dtype=np.float64)
    if temperature <= 0:
        return int(np.argmax(z))
    z = z / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


def run(args: argparse.Namespace) -> int:
    """Print ``--prompt`` and then ``--length`` characters generated after it; 1 with one line
    on bad input (an empty prompt included)."""
    if not args.prompt:
        # A model predicts from what it has read: with nothing read there is nothing to sample
        # from but a made-up start, so ask for one instead of inventing it.
        print(
            "rnnserve generate: --prompt is empty; give the text to start from, "
            "e.g. --prompt 'In the beginning'",
            file=sys.stderr,
        )
        return 1
    if args.length < 1:
        print("rnnserve generate: --length must be at least 1", file=sys.stderr)
        return 1
    if args.temperature < 0:
        print("rnnserve generate: --temperature must not be negative", file=sys.stderr)
        return 1

    def body() -> int:
        rng = np.random.default_rng(args.seed)
        with Client(client_options(args)) as client:
            model = client.model(args.model, args.version)
            if not model.is_tokens:
                raise CommandError(
                    f"model {model.name} is not a text model (it takes {model.input.describe()}"
                    "); pick a char model from `rnnserve models`"
                )
            prompt = args.prompt
            encode_inputs(model, prompt)  # an unknown character fails here, before any output
            fed: list[object] = [prompt]

            def inputs() -> Iterator[object]:
                # Read by the stream only after the previous outputs came back (see stream()).
                while fed:
                    yield fed.pop()

            with client.session(model) as session:
                sys.stdout.write(prompt)
                sys.stdout.flush()
                for produced, logits in enumerate(session.stream(inputs()), start=1):
                    last = logits[-1] if logits.ndim == 2 else logits
                    token = sample(last, args.temperature, rng)
                    sys.stdout.write(model.vocabulary[token])
                    sys.stdout.flush()
                    if produced < args.length:
                        fed.append(token)
                sys.stdout.write("\n")
        return 0

    return run_command("generate", body)
