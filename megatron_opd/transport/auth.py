"""Message authentication with a run secret, and when it is required.

Secret: 32 random bytes in a file made by `megatron-opd keygen --out PATH` (mode 0600).
`load_secret` refuses a file that its group or other users can read, or that is not exactly
32 bytes, with an error that says how to fix it.

Policy (`check_endpoint`): every socket that binds or connects beyond loopback needs the secret;
constructing one without it raises `AuthRequired`. Loopback is tcp on 127.0.0.0/8 or ::1
(also `localhost`, the `lo` interface), ipc:// and inproc://; there the secret is optional and used
when given. Anything else (`*`, other interfaces, host names resolving elsewhere, unparsable
endpoints, other transports) counts as beyond loopback. `allow_insecure=True` is the explicit
opt-out.

Wire format: with a secret, frame 0 of every message is the authentication frame, followed by
the schema's frames (JSON header, then one raw frame per tensor):

    offset  size  field
    0       4     magic b"OPDA"
    4       1     AUTH_VERSION (1); any other value is refused ("bad_auth_version")
    5       1     algorithm: 1 = HMAC-SHA256 (default), 2 = Poly1305 (one-time key per message),
                  3 = keyed BLAKE3 (PyPI `blake3`)
    6       2     zero
    8       16    sender nonce: random per sending socket
    24      8     sequence number, little-endian, strictly increasing per sender nonce
    32      8     sender wall-clock time, float64 little-endian
    40      32|16 tag (HMAC-SHA256, BLAKE3: 32 bytes; Poly1305: 16 bytes)

The tag covers the first 40 bytes of this frame, the number of following frames, and each
following frame as (8-byte length, bytes): so the header (schema, version, kind, fields, tensor
table) and every tensor byte are covered, and bytes cannot move between frames. Poly1305 uses the
one-time key HMAC-SHA256(secret, "megatron-opd poly1305 key" + first 40 bytes), unique because
(nonce, sequence) never repeats. BLAKE3 runs in its keyed mode with the key
HMAC-SHA256(secret, "megatron-opd blake3 key") (derived once per socket). Every algorithm hashes
the frames in place (incremental updates over the frame buffers, never a concatenation). A
receiver of an older build refuses algorithm 3 as "bad_mac" (it takes only its own algorithm).
Tags are compared with `hmac.compare_digest`.

What a receiver guarantees (`Opener.open`), in this order, before anything is parsed: the
message has an authentication frame ("unauthenticated" otherwise), of the known version and the
receiver's algorithm, with a correct tag ("bad_mac"); its sequence number is above every one seen
from that sender nonce ("replay": a recorded message played again to the same receiver is
counted and dropped). Per-sender sequence tracking holds `MAX_SENDERS` senders (least recently
seen forgotten first); a receiver that restarted has forgotten them all, so a replay to a *new*
receiver process is not detected here. That is why the sample channel also drops duplicate sample
ids (`SampleServer`, its dedup state saved in checkpoints), and why control messages are
latest-wins. The timestamp is checked only when a receiver sets `max_age_s` (off by default: a
sample may legitimately wait in the learner's queue for a whole training step).
A receiver without a secret refuses authenticated messages ("auth_not_configured"): both ends
of a run use the same settings.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import socket
import stat
import struct
import time
from collections import OrderedDict
from pathlib import Path

from megatron_opd.transport.schema import ProtocolError

SECRET_BYTES = 32
MAGIC = b"OPDA"
AUTH_VERSION = 1
ALGORITHMS = {"hmac-sha256": 1, "poly1305": 2, "blake3": 3}
_TAG_BYTES = {1: 32, 2: 16, 3: 32}
_PREFIX = struct.Struct("<4sBBH16sQd")  # magic, version, alg, zero, nonce, seq, time: 40 bytes
_LEN = struct.Struct("<Q")
_COUNT = struct.Struct("<I")
_POLY_KEY_LABEL = b"megatron-opd poly1305 key\x00"
_BLAKE3_KEY_LABEL = b"megatron-opd blake3 key\x00"
MAX_SENDERS = 1024


class AuthRequired(ValueError):
    """A socket beyond loopback was constructed without the run secret."""


class SecretFileError(ValueError):
    """The secret file is missing, has the wrong size, or is readable by group/others; or
    `write_secret` was given a path it must not or cannot write."""


class SecretFileExists(SecretFileError, FileExistsError):
    """`write_secret` without force onto a file that exists."""


# ------------------------------------------------------------------------------- secrets
def generate_secret() -> bytes:
    return os.urandom(SECRET_BYTES)


def write_secret(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Create PATH with 32 random bytes, mode 0600 from the start (never world-readable, not even
    briefly). Refuses to overwrite an existing file unless force, and never replaces anything
    but a regular file; a path it cannot write raises SecretFileError saying why, and leaves no
    temporary file behind."""
    path = Path(path)
    if path.is_dir():
        raise SecretFileError(f"{path} is a directory, give a file path (e.g. {path / 'run.key'})")
    if path.exists() or path.is_symlink():
        if not force:
            raise SecretFileExists(f"{path} exists, pass --force to replace it")
        if path.is_symlink() or not path.is_file():
            raise SecretFileError(f"{path} is not a regular file, give a file path")
    if not path.parent.is_dir():
        raise SecretFileError(f"{path.parent} is not a directory, create it first (or give "
                              "another path)")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise SecretFileError(f"{path.parent} is not writable, give a path in a directory you "
                              "can write")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise SecretFileError(f"cannot write {path}: {e.strerror}, give a path in a directory "
                              "you can write") from None
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, generate_secret())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise SecretFileError(f"cannot write {path}: {e.strerror or e}, give a path you "
                                  "can write") from None
        raise
    return path


def load_secret(path: str | os.PathLike) -> bytes:
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SecretFileError(f"run secret {path} does not exist, make one with "
                              f"`megatron-opd keygen --out {path}`") from None
    if not stat.S_ISREG(st.st_mode):
        raise SecretFileError(f"run secret {path} is not a regular file, give the file "
                              "`megatron-opd keygen` made")
    if st.st_mode & 0o077:
        raise SecretFileError(
            f"run secret {path} has mode {stat.S_IMODE(st.st_mode):04o}: group/other users can "
            f"read it, run `chmod 600 {path}` (and consider making a new secret)")
    data = path.read_bytes()
    if len(data) != SECRET_BYTES:
        raise SecretFileError(f"run secret {path} holds {len(data)} bytes, not "
                              f"{SECRET_BYTES}, make one with `megatron-opd keygen`")
    return data


def resolve_secret(secret: bytes | str | os.PathLike | None) -> bytes | None:
    """bytes: the secret itself (>= 32 bytes); str / path: a secret file; None: no secret."""
    if secret is None:
        return None
    if isinstance(secret, (bytes, bytearray, memoryview)):
        key = bytes(secret)
        if len(key) < SECRET_BYTES:
            raise SecretFileError(f"a run secret needs at least {SECRET_BYTES} bytes, "
                                  f"got {len(key)}")
        return key
    return load_secret(secret)


# -------------------------------------------------------------------------------- policy
def _host_is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in ("", "*"):
        return False
    if host in ("lo", "localhost"):
        return True
    try:
        addrs = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
        except (socket.gaierror, UnicodeError):
            return False  # e.g. an interface name such as eth0: beyond loopback
        addrs = [ipaddress.ip_address(i[4][0].split("%")[0]) for i in infos]
        if not addrs:
            return False
    for a in addrs:
        if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
            a = a.ipv4_mapped
        if not a.is_loopback:
            return False
    return True


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on loopback addresses only (see module doc)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        return False
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp" or not rest:
        return False
    for part in rest.split(";"):  # "source;destination" form of connect
        host, colon, port = part.rpartition(":")
        if not colon or not port:
            return False
        if not _host_is_loopback(host):
            return False
    return True


def check_endpoint(endpoint: str, secret: bytes | None, *, allow_insecure: bool = False,
                   role: str = "socket") -> None:
    """Raise AuthRequired if `endpoint` is beyond loopback and there is no secret."""
    if secret is None and not allow_insecure and not is_loopback_endpoint(endpoint):
        raise AuthRequired(
            f"{role} on {endpoint}: this address is beyond loopback, so messages must be "
            f"authenticated with the run secret; make one with `megatron-opd keygen --out "
            f"run.key` and give it to both ends (loopback tcp://127.0.0.1, ipc:// and inproc:// "
            f"may run without one)")


# ---------------------------------------------------------------------------- seal / open
def _buf(f) -> memoryview:
    return memoryview(f.buffer if hasattr(f, "buffer") else f)


class Sealer:
    """Signs outgoing messages of one socket: `seal(frames)` returns [auth frame] + frames (the
    same frame objects: tensor buffers are hashed in place, never copied)."""

    def __init__(self, secret: bytes, mac: str = "hmac-sha256"):
        if mac not in ALGORITHMS:
            raise ValueError(f"mac must be one of {sorted(ALGORITHMS)}, got {mac!r}")
        self._key, self._alg = _mac_key(secret, mac), ALGORITHMS[mac]
        self.nonce = os.urandom(16)
        self._seq = 0

    def seal(self, frames: list) -> list:
        self._seq += 1
        prefix = _PREFIX.pack(MAGIC, AUTH_VERSION, self._alg, 0, self.nonce, self._seq, time.time())
        return [prefix + _tag(self._key, self._alg, prefix, [_buf(f) for f in frames])] + frames


class Opener:
    """Checks incoming messages of one socket; `open(frames)` returns the frames after the
    authentication frame or raises ProtocolError("unauthenticated" | "bad_auth_version" |
    "bad_mac" | "replay" | "stale")."""

    def __init__(self, secret: bytes, mac: str = "hmac-sha256", max_age_s: float | None = None):
        if mac not in ALGORITHMS:
            raise ValueError(f"mac must be one of {sorted(ALGORITHMS)}, got {mac!r}")
        self._key, self._alg, self.max_age_s = _mac_key(secret, mac), ALGORITHMS[mac], max_age_s
        self._last_seq: OrderedDict[bytes, int] = OrderedDict()

    def open(self, frames: list) -> list:
        if not frames:
            raise ProtocolError("empty", "no frames")
        first = _buf(frames[0])
        if first.nbytes < 4 or bytes(first[:4]) != MAGIC:
            raise ProtocolError("unauthenticated", "no authentication frame")
        if first.nbytes < 5 or first[4] != AUTH_VERSION:
            raise ProtocolError("bad_auth_version", f"authentication frame version "
                                f"{first[4] if first.nbytes > 4 else None} (this build: {AUTH_VERSION})")
        alg = first[5] if first.nbytes > 5 else None
        if alg != self._alg or first.nbytes != _PREFIX.size + _TAG_BYTES[self._alg]:
            raise ProtocolError("bad_mac", "algorithm or length of the authentication frame")
        prefix = bytes(first[:_PREFIX.size])
        rest = frames[1:]
        expected = _tag(self._key, self._alg, prefix, [_buf(f) for f in rest])
        if not hmac.compare_digest(expected, bytes(first[_PREFIX.size:])):
            raise ProtocolError("bad_mac", "tag does not match")
        _, _, _, zero, nonce, seq, sent_at = _PREFIX.unpack(prefix)
        last = self._last_seq.get(nonce)
        if last is not None and seq <= last:
            raise ProtocolError("replay", f"sequence {seq} <= {last} from this sender")
        self._last_seq[nonce] = seq
        self._last_seq.move_to_end(nonce)
        if len(self._last_seq) > MAX_SENDERS:
            self._last_seq.popitem(last=False)
        if self.max_age_s is not None and abs(time.time() - sent_at) > self.max_age_s:
            raise ProtocolError("stale", f"sent {time.time() - sent_at:.1f} s ago")
        return rest


def _mac_key(secret: bytes, mac: str) -> bytes:
    """The key `_tag` uses (checks now that the algorithm's package is there, not at the first
    message)."""
    if mac == "poly1305":
        _poly1305()
    if mac == "blake3":
        _blake3()
        return hmac.new(secret, _BLAKE3_KEY_LABEL, hashlib.sha256).digest()  # 32 bytes exactly
    return secret


def _tag(key: bytes, alg: int, prefix: bytes, bufs: list[memoryview]) -> bytes:
    if alg == 1:
        h = hmac.new(key, prefix, hashlib.sha256)
    elif alg == 3:
        h = _blake3()(prefix, key=key)
    else:
        h = _poly1305()(hmac.new(key, _POLY_KEY_LABEL + prefix, hashlib.sha256).digest())
        h.update(prefix)
    h.update(_COUNT.pack(len(bufs)))
    for b in bufs:
        h.update(_LEN.pack(b.nbytes))
        if b.nbytes:
            h.update(b if b.contiguous and b.format == "B" else b.cast("B"))
    return h.finalize() if alg == 2 else h.digest()


def _blake3():
    try:
        from blake3 import blake3
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ValueError("mac='blake3' needs the `blake3` package (tools/setup_env.sh)") from e
    return blake3


def _poly1305():
    try:
        from cryptography.hazmat.primitives.poly1305 import Poly1305
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ValueError("mac='poly1305' needs the `cryptography` package") from e
    return Poly1305
