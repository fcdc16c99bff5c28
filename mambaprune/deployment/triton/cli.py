"""The options of ``mambaprune serve`` beside the pruning ones (the command is in mambaprune/__main__.py)."""
from __future__ import annotations

import argparse


def add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--http-port", type=port, default=8000, help="HTTP/REST port (0: a free one)")
    parser.add_argument("--metrics-port", type=port, default=8002, help="Prometheus metrics port (0: a free one)")
    parser.add_argument("--name", default="mambaprune", help="the model's name in the server")
    parser.add_argument("--max-batch-size", type=at_least_one, default=8, help="largest batch dynamic batching forms")
    parser.add_argument("--instances", type=at_least_one, default=1, help="model instances (processes)")
    parser.add_argument("--threads", type=at_least_one, default=None, help="torch threads per instance")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number in [0, 65535] (0: a free one); got {text!r}")
    return value


def at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return value
