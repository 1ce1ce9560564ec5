"""CurveZMQ for workers served over tcp://: key files, socket options, the ZAP allowlist.

A CURVE server socket alone encrypts but lets in *any* client key: libzmq only asks a
ZAP handler, and with none bound it accepts everyone. So a worker with keys always runs
a ZAP authenticator on its own context that allows exactly the public keys in its
allowlist folder. Key files are the ZPL certificates pyzmq writes: ``NAME.key`` (public)
and ``NAME.key_secret`` (public and secret).
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

log = logging.getLogger("dovetail.system.security")

KEYS_COMMAND = "dovetail-launch keys --out DIR"
SERVER_NAME = "server"          # the worker's key pair
DEFAULT_CLIENT = "coordinator"  # the default client key pair
WORKER_DIR = "worker"           # what goes to the worker host
ALLOW_DIR = "allow"             # client public keys the worker lets in
Z85_KEY_LEN = 40                # a 32-byte Curve25519 key as Z85 text
SECRET_MODE = 0o600
DIR_MODE = 0o700                # secrets are born in here before their chmod: nobody else may look
ZAP_DOMAIN = "*"                # the authenticator's rules for every ZAP domain
MAX_REPORTED_KEYS = 100         # refused keys logged by name; later ones are refused quietly
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def require_curve() -> None:
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CURVE support; install a pyzmq wheel that has it")


def check_key(key: bytes | None, path, what: str) -> bytes:
    """A Z85 key of the right length, or a ValueError naming the file."""
    try:
        ok = key is not None and len(key) == Z85_KEY_LEN and len(z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ValueError(f"{path}: no valid CURVE {what} key (expected the file written by {KEYS_COMMAND})")
    return key


def load_public(path) -> bytes:
    """The public key in a ``.key`` (or ``.key_secret``) file."""
    public, _ = _load(path)
    return check_key(public, path, "public")


def load_secret(path) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file; the two must belong together."""
    public, secret = _load(path)
    check_key(public, path, "public")
    check_key(secret, path, "secret")
    if zmq.curve_public(secret) != public:
        raise ValueError(f"{path}: its public key does not belong to its secret key")
    if not is_private(path):
        log.warning("%s can be read by other users: chmod 600 it", path)
    return public, secret


def load_allowlist(folder) -> frozenset[bytes]:
    """Every public key in ``folder/*.key``; an empty or unreadable allowlist is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder of allowed client keys (*.key)")
    keys = frozenset(load_public(p) for p in sorted(folder.glob("*.key")))
    if not keys:
        raise ValueError(f"{folder}: no client public keys (*.key) in it; {KEYS_COMMAND} writes one")
    return keys


def _load(path) -> tuple[bytes | None, bytes | None]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such key file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{path}: cannot be read by this user")
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError, IndexError) as e:
        raise ValueError(f"{path}: not a CURVE key file ({e})") from e


@dataclass
class ServerKeys:
    """A worker's keys: its own secret, and the folder of client public keys it lets in."""
    secret_file: str
    allow_dir: str
    public: bytes = field(init=False, repr=False)
    secret: bytes = field(init=False, repr=False)
    allowed: frozenset[bytes] = field(init=False, repr=False)

    def __post_init__(self):
        require_curve()
        self.public, self.secret = load_secret(self.secret_file)
        self.allowed = load_allowlist(self.allow_dir)


@dataclass
class ClientKeys:
    """A coordinator's keys for one worker: its own secret, and the worker's public key."""
    secret_file: str
    server_public_file: str
    public: bytes = field(init=False, repr=False)
    secret: bytes = field(init=False, repr=False)
    server_public: bytes = field(init=False, repr=False)

    def __post_init__(self):
        require_curve()
        self.public, self.secret = load_secret(self.secret_file)
        self.server_public = load_public(self.server_public_file)


def server_keys(secret_file: str | None, allow_dir: str | None) -> ServerKeys | None:
    """The worker flags --curve-secret and --curve-allow: both, or neither."""
    if secret_file is None and allow_dir is None:
        return None
    if secret_file is None or allow_dir is None:
        # a secret without an allowlist would let any client key in
        raise ValueError("--curve-secret and --curve-allow go together (give both, or neither)")
    return ServerKeys(str(secret_file), str(allow_dir))


def curve_server(sock: zmq.Socket, keys: ServerKeys) -> None:
    """Make ``sock`` a CURVE server; call before bind()."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def curve_client(sock: zmq.Socket, keys: ClientKeys) -> None:
    """Make ``sock`` a CURVE client of the worker whose public key ``keys`` holds; before connect()."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.server_public


class _Allowlist:
    """ZAP credentials provider: a fixed set of Z85 public keys (the validated allowlist)."""

    def __init__(self, allowed: frozenset[bytes]):
        self.allowed = allowed
        self.reported: set[bytes] = set()

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.allowed
        # once per key: a refused client reconnects every ~100 ms and would flood the log
        if not ok and key not in self.reported and len(self.reported) < MAX_REPORTED_KEYS:
            self.reported.add(key)
            log.warning("refused a client with unknown key %s", key.decode("ascii", "replace"))
        return ok


def start_authenticator(ctx: zmq.Context, keys: ServerKeys) -> ThreadAuthenticator:
    """Start a ZAP handler on ``ctx`` that lets in only ``keys.allowed``; stop() it on exit.

    Must run before the CURVE socket binds: a handshake that finds no handler is accepted.
    """
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("dovetail.zap"))
    auth.start()
    auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=_Allowlist(keys.allowed))
    return auth


def write_keys(out, clients=(DEFAULT_CLIENT,)) -> dict[str, dict[str, Path]]:
    """Write a worker key pair and one pair per client, laid out by the host each part goes to.

    ``out/worker/``: ``server.key_secret`` (--curve-secret) and ``allow/NAME.key`` (--curve-allow).
    ``out/NAME/``: ``NAME.key_secret`` (the client's secret) and ``server.key`` (the worker's public key).
    Returns {"worker": {...}, NAME: {...}} with those paths. Refuses to overwrite keys.
    """
    require_curve()
    out = Path(out)
    clients = list(dict.fromkeys(clients))
    for name in clients:
        if not NAME_RE.match(name) or name in (WORKER_DIR, SERVER_NAME):
            raise ValueError(f"bad client name {name!r}: use letters, digits, '_', '-', '.', "
                             f"and not {WORKER_DIR!r} or {SERVER_NAME!r}")
    dirs = [out / WORKER_DIR] + [out / n for n in clients]
    taken = [d for d in dirs if d.exists()]
    if taken:
        raise ValueError(f"{taken[0]} already exists: keys are never overwritten; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    for d in dirs:
        d.mkdir(mode=DIR_MODE)
    worker = out / WORKER_DIR
    (worker / ALLOW_DIR).mkdir(mode=DIR_MODE)
    server_public, server_secret = _create_pair(worker, SERVER_NAME)
    paths = {WORKER_DIR: {"secret": server_secret, "public": server_public, "allow": worker / ALLOW_DIR}}
    for name in clients:
        public, secret = _create_pair(out / name, name)
        shutil.copyfile(public, worker / ALLOW_DIR / public.name)
        shutil.copyfile(server_public, out / name / server_public.name)
        paths[name] = {"secret": secret, "public": public, "server_public": out / name / server_public.name}
    return paths


def _create_pair(folder: Path, name: str) -> tuple[Path, Path]:
    public, secret = zmq.auth.create_certificates(folder, name)
    os.chmod(secret, SECRET_MODE)
    return Path(public), Path(secret)


def is_private(path) -> bool:
    """True when only the owner may read or write ``path`` (what secret key files need)."""
    return stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0


LOOPBACK_NAMES = ("localhost",)  # besides 127.0.0.0/8 and ::1


def check_bind(bind: str, keys: ServerKeys | None = None) -> None:
    """Refuse addresses we cannot serve on, and tcp:// off loopback without CURVE keys."""
    if not bind.startswith(("ipc://", "tcp://", "inproc://")):
        raise ValueError(f"--bind must be an ipc:// or tcp:// address, got {bind!r}")
    if bind.startswith("tcp://") and keys is None and not is_loopback(bind):
        raise ValueError(
            f"--bind {bind} is reachable from other machines, and without keys anyone there could "
            f"drive this worker. Create keys with `{KEYS_COMMAND}` and pass --curve-secret "
            f"DIR/worker/server.key_secret --curve-allow DIR/worker/allow (or bind to 127.0.0.1)")


def is_loopback(tcp_address: str) -> bool:
    """True for tcp://127.x.x.x:PORT, tcp://[::1]:PORT and tcp://localhost:PORT only.

    Wildcards (*, 0.0.0.0), interface names and every other host count as reachable.
    """
    host = tcp_address[len("tcp://"):].rsplit(":", 1)[0]
    host = host.removeprefix("[").removesuffix("]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
