"""Tensor messages between the server and one device over a TCP connection (used by :mod:`splitlora.distributed.roles`).

Each message is a fixed 80-byte header (sequence number, key, dtype, shape, byte count, CRC32 of the payload, CRC32
of the header) and then the payload bytes, which the receiver reads only as far as the header says, after checking
it, and checks against the CRC before use; nothing is pickled. The first messages of a connection prove a shared
secret (HMAC-SHA256 over nonces, :func:`server_handshake`, :func:`device_handshake`). Payloads may instead travel
on an NCCL pair group (:func:`choose_transport`); :meth:`Link.send` paces payloads to a rate (link emulation); an
adapter travels as a manifest and one blob. Source: docs/distributed.md, "What happens" and "Security".
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import socket
import struct
import time
import zlib

import torch
import torch.distributed as dist

from splitlora.errors import InvalidParameterError, SplitLoRAError

MAGIC = 0x5B17_104B
VERSION = 2
MAX_DIMS = 5
#: magic u32, version u16, dtype code u8, ndim u8, sequence number u64, key i64, 5 dims i64, payload bytes u64,
#: payload CRC32 u32, then the CRC32 of those 76 bytes (u32).
HEADER = struct.Struct("<IHBBQq5qQI")
HEADER_LEN = HEADER.size + 4
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.float64, torch.bool,
          torch.uint8]
# message keys (names of adapter tensors use crc32 of "<name>/<field>")
K_CTRL, K_RATES, K_HELLO, K_PROFILE, K_HIDDEN, K_LABELS, K_MASK, K_GRAD, K_LOSS, K_STATS, K_COUNT, K_ADAPTER, \
    K_TRANSPORT, K_CHALLENGE, K_AUTH = range(1, 16)
TRANSPORTS = ("gloo", "nccl")  # codes 0, 1 of a K_TRANSPORT answer ("gloo": payloads over the TCP connection)
REFUSED, DUPLICATE, UNAUTHENTICATED = -1, -2, -3  # refusal codes of a K_TRANSPORT answer
SECRET_ENV = "SPLITLORA_SECRET"
MIN_SECRET_BYTES = 16
NONCE_BYTES = 32
#: Test hook: "1" makes every host NCCL-capable and builds a *gloo* pair group in place of the NCCL one, so the
#: two-transport code path runs on CPU-only machines (tests/distributed/). Never set it for real runs.
FAKE_NCCL_ENV = "SPLITLORA_FAKE_NCCL"
ADAM_FIELDS = ("exp_avg", "exp_avg_sq", "step")


def cuda_sync(device) -> None:
    """Wait for the GPU work queued so far on ``device`` (nothing for a CPU device), so that a host clock reading
    after it includes that work."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ProtocolError(SplitLoRAError, RuntimeError):
    """A message that is not what the receiver expects (header, checksum, order, key, dtype, shape, size): the
    connection is closed, the turn fails."""


class LinkClosed(SplitLoRAError, RuntimeError):
    """The peer closed the connection, or a message did not arrive within the timeout."""


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a flat contiguous uint8 tensor (same device)."""
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8, device=t.device)


def _crc(flat: torch.Tensor) -> int:
    return zlib.crc32(flat.cpu().numpy()) if flat.numel() else 0


class Link:
    """Tensor messages to one peer over a connected TCP socket (and, for NCCL, a second pair group for payloads).

    Args:
        sock: the connected socket (closed by :meth:`close`). timeout_s: longest wait for one message (s).
        chunk_s: pacing granularity of the rate limiter (s).
        payload_pg: an NCCL pair group for payloads (:func:`nccl_pair_group`; rank of the peer ``peer``), or None
            for payloads on the socket. payload_device: where payloads are sent from and received into ("cpu", or
            this rank's CUDA device for NCCL).
    Each direction numbers its messages from 0; a header whose number is not the next one is a ProtocolError.
    """
    def __init__(self, sock: socket.socket, timeout_s: float, chunk_s: float = 0.005, payload_pg=None,
                 payload_device="cpu", peer: int = 1):
        self.sock, self.timeout_s, self.chunk_s = sock, timeout_s, chunk_s
        self.payload_pg, self.peer = payload_pg, peer
        self.payload_device = torch.device(payload_device)
        self.sent = self.received = 0
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # a socketpair (tests) has no TCP options
            pass

    @property
    def transport(self) -> str:
        """"gloo" when payloads travel on the TCP connection, else "nccl"."""
        return "gloo" if self.payload_pg is None else "nccl"

    def close(self) -> None:
        """Close the connection (the peer notices at once) and abort the payload group, if any."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self.payload_pg is not None:
            try:
                self.payload_pg.abort()
            except Exception:  # noqa: BLE001  a broken group may refuse; it is dropped anyway
                pass

    def _peek(self) -> bytes | None:
        """One waiting byte without taking it: b"" at end of stream, None when nothing waits (or the socket is
        gone: OSError propagates)."""
        old = self.sock.gettimeout()
        self.sock.settimeout(0.0)  # a socket with a timeout would wait on MSG_DONTWAIT too
        try:
            return self.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return None
        finally:
            self.sock.settimeout(old)

    def alive(self) -> bool:
        """Whether the peer still holds the connection (no end-of-stream or reset waiting)."""
        try:
            return self._peek() != b""
        except OSError:
            return False

    def pending(self) -> bool:
        """Whether bytes the receiver has not asked for are waiting (a peer that sent more than it announced)."""
        try:
            return bool(self._peek())
        except OSError:
            return False

    # ---------------------------------------------------------------- raw bytes
    def _sendall(self, data, deadline: float) -> None:
        try:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            self.sock.sendall(data)
        except OSError as err:
            raise LinkClosed(f"the connection closed while sending ({err or type(err).__name__})") from err

    def _read_into(self, view: memoryview, deadline: float) -> None:
        got = 0
        while got < len(view):
            try:
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                n = self.sock.recv_into(view[got:])
            except socket.timeout as err:
                raise LinkClosed(f"no message within the timeout ({got} of {len(view)} bytes arrived)") from err
            except OSError as err:
                raise LinkClosed(f"the connection closed while receiving ({err or type(err).__name__})") from err
            if n == 0:
                raise LinkClosed(f"the peer closed the connection ({got} of {len(view)} bytes arrived)")
            got += n

    # ---------------------------------------------------------------- messages
    def send(self, t: torch.Tensor, key: int, rate_bps: float = 0.0) -> int:
        """Send ``t`` (any dtype of ``DTYPES``, <= 5 dims); with ``rate_bps`` > 0 the payload leaves in chunks
        paced to that rate (its last byte 8 n / rate after the header). Returns the payload bytes n. Raises
        InvalidParameterError for more than 5 dims or a dtype outside ``DTYPES``; LinkClosed when the peer is gone
        or ``timeout_s`` passes."""
        if t.dim() > MAX_DIMS:
            raise InvalidParameterError(f"tensor of {t.dim()} dims is invalid: must have at most {MAX_DIMS}")
        if t.dtype not in DTYPES:
            raise InvalidParameterError(f"dtype={t.dtype} is invalid: must be one of {DTYPES}")
        dev = self.payload_device if self.payload_pg is not None else torch.device("cpu")
        flat = _bytes_of(t.detach().to(dev))
        n = flat.numel()
        dims = list(t.shape) + [0] * (MAX_DIMS - t.dim())
        head = HEADER.pack(MAGIC, VERSION, DTYPES.index(t.dtype), t.dim(), self.sent, key, *dims, n, _crc(flat))
        self.sent += 1
        deadline = time.monotonic() + self.timeout_s
        self._sendall(head + struct.pack("<I", zlib.crc32(head)), deadline)
        t0 = time.perf_counter()
        if self.payload_pg is not None:  # NCCL: one message, leaving when the rate says its last byte may
            if rate_bps > 0:
                time.sleep(max(t0 + 8.0 * n / rate_bps - time.perf_counter(), 0.0))
            if n:
                self.payload_pg.send([flat], self.peer, 0).wait(datetime.timedelta(seconds=self.timeout_s))
                cuda_sync(self.payload_device)
            return n
        data = memoryview(flat.numpy())
        chunk = n if rate_bps <= 0 else max(256, int(rate_bps / 8 * self.chunk_s))
        for off in range(0, n, max(chunk, 1)):
            end = min(off + chunk, n)
            if rate_bps > 0:
                delay = t0 + 8.0 * end / rate_bps - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            self._sendall(data[off:end], deadline + 8.0 * end / rate_bps if rate_bps > 0 else deadline)
        return n

    def recv_header(self, timeout_s: float | None = None) -> tuple[tuple, float]:
        """Wait for the next header; returns it, checked (magic, version, header CRC, sequence number, dtype code,
        ndim, dims, byte count = elements x element size), as ``(key, dtype, shape, nbytes, crc)`` and its arrival
        time (``time.perf_counter``). Raises ProtocolError for a bad header, LinkClosed."""
        raw = bytearray(HEADER_LEN)
        self._read_into(memoryview(raw), time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s))
        t0 = time.perf_counter()
        magic, version, code, ndim, seq, key, *rest = HEADER.unpack_from(raw)
        dims, nbytes, crc = rest[:MAX_DIMS], rest[MAX_DIMS], rest[MAX_DIMS + 1]
        if magic != MAGIC or version != VERSION or struct.unpack_from("<I", raw, HEADER.size)[0] != \
                zlib.crc32(raw[:HEADER.size]):
            raise ProtocolError(f"bad header (magic {magic:#x}, version {version}, or header checksum)")
        if seq != self.received:
            raise ProtocolError(f"message {seq} out of order: expected message {self.received}")
        self.received += 1
        if not 0 <= code < len(DTYPES) or not 0 <= ndim <= MAX_DIMS or any(d < 0 for d in dims) or \
                any(dims[ndim:]):
            raise ProtocolError(f"bad header: dtype code {code}, {ndim} dims {dims}")
        dt, shp = DTYPES[code], tuple(dims[:ndim])
        numel = 1
        for d in shp:
            numel *= d
        if nbytes != numel * torch.empty(0, dtype=dt).element_size():
            raise ProtocolError(f"message key {key}: {nbytes} bytes announced for shape {shp} of {dt}")
        return (key, dt, shp, nbytes, crc), t0

    def recv_payload(self, h: tuple, t0: float, key: int, dtype=None, shape=None, max_bytes: int = 1 << 31,
                     check=None, timeout_s: float | None = None):
        """Receive the payload of header ``h`` after checking key, dtype, shape (exact tuple, or ``check(shape)``
        raising) and size, then its CRC32; returns (tensor, seconds from the header's arrival to the last payload
        byte). Raises ProtocolError, LinkClosed."""
        hkey, dt, shp, nbytes, crc = h
        if hkey != key:
            raise ProtocolError(f"message key {hkey}: expected {key}")
        if dtype is not None and dt != dtype:
            raise ProtocolError(f"message key {key} has dtype {dt}: expected {dtype}")
        if shape is not None and shp != tuple(shape):
            raise ProtocolError(f"message key {key} has shape {shp}: expected {tuple(shape)}")
        if check is not None:
            check(shp)
        if nbytes > max_bytes:
            raise ProtocolError(f"message key {key} of {nbytes} bytes exceeds the limit {max_bytes}")
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s) - \
            (time.perf_counter() - t0)
        if self.payload_pg is not None:
            buf = torch.zeros(nbytes, dtype=torch.uint8, device=self.payload_device)
            if nbytes:
                self.payload_pg.recv([buf], self.peer, 0).wait(
                    datetime.timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
                cuda_sync(self.payload_device)
        else:
            buf = torch.zeros(nbytes, dtype=torch.uint8)
            if nbytes:
                self._read_into(memoryview(buf.numpy()), deadline)
        seconds = time.perf_counter() - t0
        if _crc(buf) != crc:
            raise ProtocolError(f"message key {key} of {nbytes} bytes fails its checksum")
        return (buf.view(dt).reshape(shp) if nbytes else torch.zeros(shp, dtype=dt, device=buf.device)), seconds

    def recv(self, key: int, dtype: torch.dtype | None = None, shape=None, timeout_s: float | None = None, **kw):
        """:meth:`recv_header` + :meth:`recv_payload`: (tensor, seconds)."""
        h, t0 = self.recv_header(timeout_s)
        return self.recv_payload(h, t0, key, dtype, shape, timeout_s=timeout_s, **kw)


# ============================================================================================ authentication
def load_secret(secret_file: str | None) -> bytes:
    """The run's shared secret: the contents of ``secret_file`` (``dist.secret_file``), else the environment
    variable :data:`SECRET_ENV` (``launch_local`` generates one for its processes). At least
    :data:`MIN_SECRET_BYTES` bytes after stripping whitespace. Raises InvalidParameterError naming the source."""
    if secret_file is not None:
        try:
            secret = open(secret_file, "rb").read().strip()
        except OSError as err:
            raise InvalidParameterError(f"dist.secret_file={secret_file!r} is invalid: cannot be read ({err})") from None
        source = f"dist.secret_file={secret_file!r}"
    elif os.environ.get(SECRET_ENV):
        secret, source = os.environ[SECRET_ENV].strip().encode(), SECRET_ENV
    else:
        raise InvalidParameterError(
            f"no shared secret: set the environment variable {SECRET_ENV} or dist.secret_file to the same secret "
            f"(>= {MIN_SECRET_BYTES} bytes, e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`) on "
            "every host; --local generates one")
    if len(secret) < MIN_SECRET_BYTES:
        raise InvalidParameterError(f"{source} is invalid: the secret has {len(secret)} bytes; must have at least "
                                    f"{MIN_SECRET_BYTES}")
    return secret


def _mac(secret: bytes, *parts) -> bytes:
    h = hmac.new(secret, digestmod=hashlib.sha256)
    for p in parts:
        h.update(p if isinstance(p, (bytes, bytearray)) else p.contiguous().numpy().tobytes())
    return h.digest()


def _u8(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def server_handshake(link: Link, secret: bytes, timeout_s: float):
    """Server side of a connection's first messages: send a nonce, receive the device's hello (int64 ``[device
    index, configuration fingerprint, last step, NCCL-capable]``), its profile (float64 ``[FLOP/s, memory
    bytes]``) and its proof, HMAC-SHA256(secret, "hello", nonce, hello, profile, device nonce). Returns
    ``(hello, profile, device_nonce, server_nonce, authenticated)``; the caller answers with :func:`server_answer`.
    Raises ProtocolError, LinkClosed."""
    nonce = os.urandom(NONCE_BYTES)
    link.send(_u8(nonce), K_CHALLENGE)
    hello, _ = link.recv(K_HELLO, torch.int64, (4,), timeout_s=timeout_s)
    profile, _ = link.recv(K_PROFILE, torch.float64, (2,), timeout_s=timeout_s)
    auth, _ = link.recv(K_AUTH, torch.uint8, (NONCE_BYTES + 32,), timeout_s=timeout_s)
    dnonce, proof = auth[:NONCE_BYTES].numpy().tobytes(), auth[NONCE_BYTES:].numpy().tobytes()
    ok = hmac.compare_digest(proof, _mac(secret, b"hello", nonce, hello, profile, dnonce))
    return hello.tolist(), tuple(profile.tolist()), dnonce, nonce, ok


def server_answer(link: Link, secret: bytes, dnonce: bytes, nonce: bytes, code: int, store_port: int = 0,
                  token: int = 0) -> None:
    """Answer a hello: int64 ``[code, store port, token]`` (code: index into :data:`TRANSPORTS`, or
    :data:`REFUSED`, :data:`DUPLICATE`, :data:`UNAUTHENTICATED`) and the server's proof HMAC-SHA256(secret,
    "answer", device nonce, nonce, answer)."""
    answer = torch.tensor([code, store_port, token], dtype=torch.int64)
    link.send(answer, K_TRANSPORT)
    link.send(_u8(_mac(secret, b"answer", dnonce, nonce, answer)), K_AUTH)


def device_handshake(link: Link, secret: bytes, hello: list[int], profile) -> list[int]:
    """Device side: prove the secret over the server's nonce and check the server's proof of it. Returns the
    answer ``[code, store port, token]``. Raises ProtocolError when the server's proof is wrong (not the run's
    server), LinkClosed."""
    nonce, _ = link.recv(K_CHALLENGE, torch.uint8, (NONCE_BYTES,))
    nonce = nonce.numpy().tobytes()
    hello_t = torch.tensor(hello, dtype=torch.int64)
    profile_t = torch.tensor(profile, dtype=torch.float64)
    dnonce = os.urandom(NONCE_BYTES)
    link.send(hello_t, K_HELLO)
    link.send(profile_t, K_PROFILE)
    link.send(_u8(dnonce + _mac(secret, b"hello", nonce, hello_t, profile_t, dnonce)), K_AUTH)
    answer, _ = link.recv(K_TRANSPORT, torch.int64, (3,))
    proof, _ = link.recv(K_AUTH, torch.uint8, (32,))
    if int(answer[0]) != UNAUTHENTICATED and not hmac.compare_digest(
            proof.numpy().tobytes(), _mac(secret, b"answer", dnonce, nonce, answer)):
        raise ProtocolError("the server did not prove the shared secret: not this run's server")
    return answer.tolist()


# ============================================================================================ adapters
def _name_key(name: str) -> int:
    return zlib.crc32(name.encode()) + 1000  # above the fixed message keys


def send_adapter(link: Link, payload: dict, rate_bps: float = 0.0) -> int:
    """Send a :meth:`~splitlora.training.trainer.LoraNode.export` payload (values + AdamW state) as two messages: a
    manifest (n, 3) int64 of [name key, dtype code, numel] and one uint8 blob of the tensors in that order.
    Returns the bytes sent."""
    items = [(f"{n}/param", t) for n, t in sorted(payload["params"].items())]
    items += [(f"{n}/{k}", payload["opt"][n][k]) for n in sorted(payload["opt"]) for k in ADAM_FIELDS
              if k in payload["opt"][n]]
    manifest = torch.tensor([[_name_key(n), DTYPES.index(t.dtype), t.numel()] for n, t in items],
                            dtype=torch.int64).reshape(-1, 3)
    blob = [_bytes_of(t.detach().to(link.payload_device)) for _, t in items]
    blob = torch.cat(blob) if blob else torch.empty(0, dtype=torch.uint8)
    return link.send(manifest, K_COUNT) + link.send(blob, K_ADAPTER, rate_bps)


def recv_adapter(link: Link, expected: dict[str, torch.Tensor]) -> tuple[dict, int]:
    """Receive an adapter payload holding exactly the names of ``expected`` (name -> parameter). The manifest is
    checked before the blob is read: another name (e.g. a server-side one), a wrong size or dtype, a repeat,
    a missing parameter or a partial optimiser state raise ProtocolError. Returns (payload, blob bytes)."""
    allowed = {}
    for n, p in expected.items():
        for f_, shp, dt in (("param", p.shape, p.dtype), ("exp_avg", p.shape, p.dtype),
                            ("exp_avg_sq", p.shape, p.dtype), ("step", (), torch.float32)):
            allowed[_name_key(f"{n}/{f_}")] = (n, f_, tuple(shp), dt)
    if len(allowed) != 4 * len(expected):
        raise RuntimeError("adapter name hash collision")

    def check(shp):
        if len(shp) != 2 or shp[1] != 3 or shp[0] > len(allowed):
            raise ProtocolError(f"adapter manifest of shape {shp}: expected (at most {len(allowed)}, 3)")

    manifest, _ = link.recv(K_COUNT, torch.int64, check=check)
    entries, seen, nbytes = [], set(), 0
    for key, code, numel in manifest.tolist():
        if key not in allowed or key in seen:
            raise ProtocolError(f"adapter tensor with key {key} refused: not a device-side name of this cut "
                                "(or sent twice)")
        seen.add(key)
        n, f_, shp, dt = allowed[key]
        size = 1
        for d in shp:
            size *= d
        if not 0 <= code < len(DTYPES) or DTYPES[code] != dt or numel != size:
            raise ProtocolError(f"adapter tensor {n}/{f_}: dtype code {code}, {numel} elements; expected {dt}, "
                                f"shape {shp}")
        entries.append((n, f_, shp, dt, nbytes))
        nbytes += size * torch.empty(0, dtype=dt).element_size()
    if {n for n, f_, *_ in entries if f_ == "param"} != set(expected):
        raise ProtocolError(f"adapter is missing {sorted(set(expected) - {e[0] for e in entries})[:3]}")
    opt_fields: dict[str, set] = {}
    for n, f_, *_ in entries:
        if f_ != "param":
            opt_fields.setdefault(n, set()).add(f_)
    if any(v != set(ADAM_FIELDS) for v in opt_fields.values()):
        raise ProtocolError("adapter optimiser state is incomplete")
    blob, _ = link.recv(K_ADAPTER, torch.uint8, (nbytes,))
    params, opt = {}, {}
    for i, (n, f_, shp, dt, off) in enumerate(entries):
        end = entries[i + 1][4] if i + 1 < len(entries) else nbytes
        t = blob[off:end].view(dt).reshape(shp).clone()
        if f_ == "param":
            params[n] = t
        else:
            opt.setdefault(n, {})[f_] = t
    return {"params": params, "opt": opt}, nbytes


# ============================================================================================ NCCL payloads
def nccl_capable(device) -> bool:
    """Whether this rank can move payloads with NCCL: it computes on a CUDA ``device`` and torch has NCCL (or the
    :data:`FAKE_NCCL_ENV` test hook is set)."""
    if os.environ.get(FAKE_NCCL_ENV) == "1":
        return True
    return torch.device(device).type == "cuda" and dist.is_available() and dist.is_nccl_available()


def choose_transport(backend: str, server_capable: bool, device_capable: bool) -> str:
    """Payload transport of one server-device pair: "nccl" or "gloo" (the pair's TCP connection).

    ``backend`` is ``dist.backend`` of the run configuration: "gloo" (always the TCP connection), "nccl" (both
    ends must be NCCL-capable, :func:`nccl_capable`) or "auto" (NCCL where both ends are, TCP otherwise).
    Raises ValueError when "nccl" is asked for and an end cannot, or ``backend`` is unknown.
    """
    if backend not in ("auto", "gloo", "nccl"):
        raise InvalidParameterError(f"dist.backend={backend!r} is invalid: must be one of ['auto', 'gloo', 'nccl']")
    both = server_capable and device_capable
    if backend == "nccl" and not both:
        who = [n for n, ok in (("server", server_capable), ("device", device_capable)) if not ok]
        raise InvalidParameterError(f"dist.backend='nccl' is invalid for this pair: the {' and '.join(who)} cannot use NCCL "
                         "(no CUDA compute device or torch built without NCCL); must be 'gloo' or 'auto'")
    return "nccl" if backend != "gloo" and both else "gloo"


def nccl_pair_group(store, m: int, token: int, rank: int, timeout_s: float, device, host: str = "127.0.0.1"):
    """The size-2 NCCL group for the payloads of device m, under the one-connection ``token`` the server sent in
    its authenticated answer; ``rank`` 0 = server, 1 = device; ``device``: this rank's CUDA device. Waits in
    ``wait()`` are blocking (``TORCH_NCCL_BLOCKING_WAIT=1``), so a timeout raises instead of hanging. With
    :data:`FAKE_NCCL_ENV` set: a gloo group on ``host`` (tests)."""
    prefix = dist.PrefixStore(f"splitlora/pair/{m}/{token}/payload", store)
    if os.environ.get(FAKE_NCCL_ENV) == "1":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = datetime.timedelta(seconds=timeout_s)
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return dist.ProcessGroupGloo(prefix, rank, 2, opts)
    os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    torch.cuda.set_device(torch.device(device))
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    opts.is_high_priority_stream = False
    return dist.ProcessGroupNCCL(prefix, rank, 2, opts)


def local_addr(server_addr: str) -> str:
    """This host's address on the route to the server (a UDP connect sends nothing)."""
    if server_addr in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1" if server_addr != "::1" else "::1"
    fam = socket.AF_INET6 if ":" in server_addr else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.connect((server_addr, 9))
        return s.getsockname()[0]
