"""Tensor messages between the two processes of a pair process group (used by :mod:`splitlora.distributed.roles`).

Each message is an int64 header and then the payload bytes, which the receiver checks against the header before
it reads them; nothing is pickled. Headers travel on a gloo pair group, payloads on the same group or on a second,
NCCL one (:func:`choose_transport`); :meth:`Link.send` paces payloads to a rate (link emulation); an adapter
travels as a manifest and one blob. Source: docs/distributed.md, "What happens" and "GPUs: compute device and NCCL".
"""
from __future__ import annotations

import datetime
import os
import socket
import time
import zlib

import torch
import torch.distributed as dist

from splitlora.errors import InvalidParameterError, SplitLoRAError

MAGIC = 0x5B17_104A
HEADER_LEN = 10  # magic, dtype code, ndim, d0..d4, key, chunk bytes
MAX_DIMS = 5
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.float64, torch.bool,
          torch.uint8]
# message keys (names of adapter tensors use crc32 of "<name>/<field>")
K_CTRL, K_RATES, K_HELLO, K_PROFILE, K_HIDDEN, K_LABELS, K_MASK, K_GRAD, K_LOSS, K_STATS, K_COUNT, K_ADAPTER, \
    K_TRANSPORT = range(1, 14)
TRANSPORTS = ("gloo", "nccl")  # codes 0, 1 of a K_TRANSPORT message; -1 = join refused
#: Test hook: "1" makes every host NCCL-capable and builds a second *gloo* pair group in place of the NCCL one, so
#: the two-group code path runs on CPU-only machines (tests/distributed/test_distributed.py). Never set it for real runs.
FAKE_NCCL_ENV = "SPLITLORA_FAKE_NCCL"
ADAM_FIELDS = ("exp_avg", "exp_avg_sq", "step")


def cuda_sync(device) -> None:
    """Wait for the GPU work queued so far on ``device`` (nothing for a CPU device), so that a host clock reading
    after it includes that work."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ProtocolError(SplitLoRAError, RuntimeError):
    """A message that is not what the receiver expects (dtype, shape, key, magic): the peer is dropped."""


class Link:
    """Tensor messages to one peer of a pair process group: header, then payload (paced when a rate is given).

    Args:
        pg: the gloo pair group (headers; payloads too unless ``payload_pg`` is given).
        peer: the other rank of the pair (0 server, 1 device). timeout_s: longest wait for one message (s).
        chunk_s: pacing granularity of the rate limiter (s).
        payload_pg: a second pair group for payloads (the NCCL one of :func:`nccl_pair_group`), or None.
        payload_device: where payloads are sent from and received into ("cpu" for gloo, this rank's CUDA device
            for NCCL); received tensors live there.
    """
    def __init__(self, pg, peer: int, timeout_s: float, chunk_s: float = 0.005, payload_pg=None,
                 payload_device="cpu"):
        self.pg, self.peer, self.timeout_s, self.chunk_s = pg, peer, timeout_s, chunk_s
        self.payload_pg = pg if payload_pg is None else payload_pg
        self.payload_device = torch.device(payload_device)

    @property
    def transport(self) -> str:
        """"gloo" when payloads share the header group, else "nccl"."""
        return "gloo" if self.payload_pg is self.pg else "nccl"

    def _td(self, timeout_s=None):
        return datetime.timedelta(seconds=self.timeout_s if timeout_s is None else timeout_s)

    def _sync(self) -> None:
        cuda_sync(self.payload_device)  # NCCL work runs on a stream: the bytes have arrived after this

    def close(self) -> None:
        """Abort both groups (a broken group may refuse; it is dropped anyway)."""
        for pg in {id(self.pg): self.pg, id(self.payload_pg): self.payload_pg}.values():
            try:
                pg.abort()
            except Exception:  # noqa: BLE001
                pass

    def send(self, t: torch.Tensor, key: int, rate_bps: float = 0.0) -> int:
        """Send ``t`` (any dtype of ``DTYPES``, <= 5 dims); with ``rate_bps`` > 0 the payload leaves in chunks
        paced to that rate; the payload leaves from ``payload_device`` (copied there if needed). Returns the
        payload bytes. Raises ValueError for more than 5 dims or a dtype outside ``DTYPES``; RuntimeError (from
        the process group) when the peer is gone or ``timeout_s`` passes."""
        t = t.detach().to(self.payload_device).contiguous()
        if t.dim() > MAX_DIMS:
            raise InvalidParameterError(f"tensor of {t.dim()} dims is invalid: must have at most {MAX_DIMS}")
        if t.dtype not in DTYPES:
            raise InvalidParameterError(f"dtype={t.dtype} is invalid: must be one of {DTYPES}")
        flat = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8, device=t.device)
        n = flat.numel()
        chunk = n if rate_bps <= 0 else max(256, int(rate_bps / 8 * self.chunk_s))
        dims = list(t.shape) + [0] * (MAX_DIMS - t.dim())
        hdr = torch.tensor([MAGIC, DTYPES.index(t.dtype), t.dim(), *dims, key, max(chunk, 1)], dtype=torch.int64)
        self.pg.send([hdr], self.peer, 0).wait(self._td())
        t0 = time.perf_counter()
        for off in range(0, n, max(chunk, 1)):
            end = min(off + chunk, n)
            if rate_bps > 0:
                delay = t0 + 8.0 * end / rate_bps - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            self.payload_pg.send([flat[off:end]], self.peer, 0).wait(self._td())
        self._sync()
        return n

    def recv_header(self, timeout_s: float | None = None) -> tuple[list[int], float]:
        """Wait for the next header; returns it (checked for magic, dtype code, ndim) and its arrival time."""
        hdr = torch.empty(HEADER_LEN, dtype=torch.int64)
        self.pg.recv([hdr], self.peer, 0).wait(self._td(timeout_s))
        t0 = time.perf_counter()
        h = hdr.tolist()
        if h[0] != MAGIC or not 0 <= h[1] < len(DTYPES) or not 0 <= h[2] <= MAX_DIMS or any(d < 0 for d in h[3:8]):
            raise ProtocolError(f"bad header {h}")
        return h, t0

    def recv_payload(self, h: list[int], t0: float, key: int, dtype=None, shape=None, max_bytes: int = 1 << 31,
                     check=None, timeout_s: float | None = None):
        """Receive the payload of header ``h`` after checking key, dtype, shape (exact tuple, or ``check(shape)``
        raising) and size; returns (tensor, seconds from the header's arrival to the last payload byte)."""
        dt, shp = DTYPES[h[1]], tuple(h[3:3 + h[2]])
        if h[8] != key:
            raise ProtocolError(f"message key {h[8]}: expected {key}")
        if dtype is not None and dt != dtype:
            raise ProtocolError(f"message key {key} has dtype {dt}: expected {dtype}")
        if shape is not None and shp != tuple(shape):
            raise ProtocolError(f"message key {key} has shape {shp}: expected {tuple(shape)}")
        if check is not None:
            check(shp)
        numel = 1
        for d in shp:
            numel *= d
        nbytes = numel * torch.empty(0, dtype=dt).element_size()
        if nbytes > max_bytes:
            raise ProtocolError(f"message key {key} of {nbytes} bytes exceeds the limit {max_bytes}")
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.payload_device)
        chunk = max(int(h[9]), 1)
        works = [self.payload_pg.recv([buf[o:min(o + chunk, nbytes)]], self.peer, 0)
                 for o in range(0, nbytes, chunk)]
        deadline = t0 + (self.timeout_s if timeout_s is None else timeout_s)
        for w in works:
            w.wait(datetime.timedelta(seconds=max(deadline - time.perf_counter(), 0.001)))
        self._sync()
        seconds = time.perf_counter() - t0
        return (buf.view(dt).reshape(shp) if numel else torch.empty(shp, dtype=dt, device=buf.device)), seconds

    def recv(self, key: int, dtype: torch.dtype | None = None, shape=None, timeout_s: float | None = None, **kw):
        """:meth:`recv_header` + :meth:`recv_payload`: (tensor, seconds)."""
        h, t0 = self.recv_header(timeout_s)
        return self.recv_payload(h, t0, key, dtype, shape, **kw)


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
    blob = [t.detach().to(link.payload_device).contiguous().reshape(-1).view(torch.uint8) for _, t in items]
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


def pair_group(store, m: int, gen: int, rank: int, host: str, timeout_s: float):
    """The size-2 gloo group of device m (generation ``gen``); ``rank`` 0 = server, 1 = device."""
    return _gloo_pair(dist.PrefixStore(f"splitlora/pair/{m}/{gen}", store), rank, host, timeout_s)


def _gloo_pair(prefix_store, rank: int, host: str, timeout_s: float):
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(prefix_store, rank, 2, opts)


def nccl_capable(device) -> bool:
    """Whether this rank can move payloads with NCCL: it computes on a CUDA ``device`` and torch has NCCL (or the
    :data:`FAKE_NCCL_ENV` test hook is set)."""
    if os.environ.get(FAKE_NCCL_ENV) == "1":
        return True
    return torch.device(device).type == "cuda" and dist.is_available() and dist.is_nccl_available()


def choose_transport(backend: str, server_capable: bool, device_capable: bool) -> str:
    """Payload transport of one server-device pair: "nccl" or "gloo".

    ``backend`` is ``dist.backend`` of the run configuration: "gloo" (always gloo), "nccl" (both ends must be
    NCCL-capable, :func:`nccl_capable`) or "auto" (NCCL where both ends are, gloo otherwise).
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


def nccl_pair_group(store, m: int, gen: int, rank: int, timeout_s: float, device):
    """The size-2 NCCL group for the payloads of device m (generation ``gen``); ``rank`` 0 = server, 1 = device;
    ``device``: this rank's CUDA device. Waits in ``wait()`` are blocking (``TORCH_NCCL_BLOCKING_WAIT=1``), so
    a timeout raises instead of hanging. With :data:`FAKE_NCCL_ENV` set: a second gloo group (tests)."""
    prefix = dist.PrefixStore(f"splitlora/pair/{m}/{gen}/payload", store)
    if os.environ.get(FAKE_NCCL_ENV) == "1":
        return _gloo_pair(prefix, rank, "127.0.0.1", timeout_s)
    os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    torch.cuda.set_device(torch.device(device))
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    opts.is_high_priority_stream = False
    return dist.ProcessGroupNCCL(prefix, rank, 2, opts)


def _local_addr(server_addr: str) -> str:
    """This host's address on the route to the server (a UDP connect sends nothing)."""
    if server_addr in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1" if server_addr != "::1" else "::1"
    fam = socket.AF_INET6 if ":" in server_addr else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.connect((server_addr, 9))
        return s.getsockname()[0]

