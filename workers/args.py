"""The command line every worker role shares: flags, parsing into the config, logging."""
from __future__ import annotations

import argparse
import faulthandler
import logging

from dovetail.models.options import DEFAULT_LLAMA_EXTRA_BUFFERS, LLAMA_EXTRA_BUFFERS
from dovetail.system.security import KEYS_COMMAND


def worker_parser(role: str, description: str) -> argparse.ArgumentParser:
    """The flags every worker takes; each role adds its own."""
    p = argparse.ArgumentParser(prog=f"python -m dovetail.workers.{role}", description=description)
    p.add_argument("--bind", required=True, help="address to serve on (ipc://PATH or tcp://HOST:PORT)")
    p.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32 | float64 (auto: bf16 where the device has it)")
    p.add_argument("--cpus", default=None, help="CPUs to pin to, e.g. '0-31' or '0,2,4' (default: all)")
    p.add_argument("--max-requests", type=int, default=256, help="most requests open at once")
    p.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone (0: never)")
    p.add_argument("--parent-death-signal", action="store_true",
                   help="with --parent-pid: also have the kernel signal us when the spawning thread exits "
                        "(Linux prctl; only for workers spawned from their coordinator's main thread)")
    p.add_argument("--heartbeat-timeout", type=float, default=0.0, metavar="S",
                   help="exit after S seconds without any message from a coordinator, counted from the first "
                        "(remote workers; the coordinator heartbeats every heartbeat_interval_s); 0: never")
    p.add_argument("--log-level", default="info", help="debug | info | warning")
    p.add_argument("--curve-secret", default=None, metavar="FILE",
                   help=f"this worker's CurveZMQ secret key file (needed for tcp:// off loopback; {KEYS_COMMAND} writes it)")
    p.add_argument("--curve-allow", default=None, metavar="DIR",
                   help="folder of client public keys (*.key) allowed to connect; goes with --curve-secret")
    return p


def parse_config(config_cls, parser: argparse.ArgumentParser, argv=None):
    """Parse the command line straight into the role's config dataclass (validated there)."""
    args = vars(parser.parse_args(argv))
    try:
        return config_cls(**{k.replace("-", "_"): v for k, v in args.items()})
    except ValueError as e:
        parser.error(str(e))  # usage and the reason, exit code 2: a bad flag needs no traceback


def setup_logging(level: str, role: str) -> None:
    # A crash in native code (llama.cpp, torch) prints the Python stack instead of nothing
    # (launch() also passes -X faulthandler, which covers the imports before this).
    if not faulthandler.is_enabled():
        faulthandler.enable()
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format=f"%(asctime)s {role}[%(process)d] %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")


def add_extra_buffers_flag(parser) -> None:
    """--llama-extra-buffers, for every worker that may run a model on llama.cpp."""
    parser.add_argument("--llama-extra-buffers", default=DEFAULT_LLAMA_EXTRA_BUFFERS, choices=LLAMA_EXTRA_BUFFERS,
                        help="llama.cpp only: its extra (repacked / AMX) weight buffers; auto (default): on unless "
                             "a test decode with them, run once per machine in a child process, failed")
