"""Tensor messages between two processes of a gloo pair group (used by :mod:`splitlora.distributed`).

Every message is an int64 header tensor ``[magic, dtype code, ndim, d0..d4, key, chunk bytes]`` followed by the
payload bytes (uint8, possibly in chunks); the receiver checks magic, dtype, shape and key before receiving the
payload. Nothing is pickled. An adapter hand-over (LoRA values + AdamW state) is a manifest of
``[name key, dtype code, numel]`` rows and one blob; the receiver accepts only the names, dtypes and sizes it
expects.

Link emulation (a): with a rate every payload is sent in chunks paced so that its last byte leaves at
8 bytes / rate after its header (the rate limiter of :meth:`Link.send`).
"""
from __future__ import annotations

import datetime
import socket
import time
import zlib

import torch

MAGIC = 0x5B17_104A
HEADER_LEN = 10  # magic, dtype code, ndim, d0..d4, key, chunk bytes
MAX_DIMS = 5
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.float64, torch.bool,
          torch.uint8]
# message keys (names of adapter tensors use crc32 of "<name>/<field>")
K_CTRL, K_RATES, K_HELLO, K_PROFILE, K_HIDDEN, K_LABELS, K_MASK, K_GRAD, K_LOSS, K_STATS, K_COUNT, K_ADAPTER = \
    range(1, 13)
ADAM_FIELDS = ("exp_avg", "exp_avg_sq", "step")


class ProtocolError(RuntimeError):
    """A message that is not what the receiver expects (dtype, shape, key, magic): the peer is dropped."""


class Link:
    """Tensor messages to one peer of a pair process group: header, then payload (paced when a rate is given)."""

    def __init__(self, pg, peer: int, timeout_s: float, chunk_s: float = 0.005):
        self.pg, self.peer, self.timeout_s, self.chunk_s = pg, peer, timeout_s, chunk_s

    def _td(self, timeout_s=None):
        return datetime.timedelta(seconds=self.timeout_s if timeout_s is None else timeout_s)

    def send(self, t: torch.Tensor, key: int, rate_bps: float = 0.0) -> int:
        """Send ``t`` (any dtype of ``DTYPES``, <= 5 dims); with ``rate_bps`` > 0 the payload leaves in chunks
        paced to that rate. Returns the payload bytes."""
        t = t.detach().to("cpu").contiguous()
        if t.dim() > MAX_DIMS:
            raise ValueError(f"tensor of {t.dim()} dims is invalid: must have at most {MAX_DIMS}")
        flat = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
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
            self.pg.send([flat[off:end]], self.peer, 0).wait(self._td())
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
        buf = torch.empty(nbytes, dtype=torch.uint8)
        chunk = max(int(h[9]), 1)
        works = [self.pg.recv([buf[o:min(o + chunk, nbytes)]], self.peer, 0) for o in range(0, nbytes, chunk)]
        deadline = t0 + (self.timeout_s if timeout_s is None else timeout_s)
        for w in works:
            w.wait(datetime.timedelta(seconds=max(deadline - time.perf_counter(), 0.001)))
        seconds = time.perf_counter() - t0
        return (buf.view(dt).reshape(shp) if numel else torch.empty(shp, dtype=dt)), seconds

    def recv(self, key: int, dtype: torch.dtype | None = None, shape=None, timeout_s: float | None = None, **kw):
        """:meth:`recv_header` + :meth:`recv_payload`: (tensor, seconds)."""
        h, t0 = self.recv_header(timeout_s)
        return self.recv_payload(h, t0, key, dtype, shape, **kw)


def _name_key(name: str) -> int:
    return zlib.crc32(name.encode()) + 1000  # above the fixed message keys


def send_adapter(link: Link, payload: dict, rate_bps: float = 0.0) -> int:
    """Send a :meth:`~splitlora.training.LoraNode.export` payload (values + AdamW state) as two messages: a
    manifest (n, 3) int64 of [name key, dtype code, numel] and one uint8 blob of the tensors in that order.
    Returns the bytes sent."""
    items = [(f"{n}/param", t) for n, t in sorted(payload["params"].items())]
    items += [(f"{n}/{k}", payload["opt"][n][k]) for n in sorted(payload["opt"]) for k in ADAM_FIELDS
              if k in payload["opt"][n]]
    manifest = torch.tensor([[_name_key(n), DTYPES.index(t.dtype), t.numel()] for n, t in items],
                            dtype=torch.int64).reshape(-1, 3)
    blob = [t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8) for _, t in items]
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
    import torch.distributed as dist

    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(dist.PrefixStore(f"splitlora/pair/{m}/{gen}", store), rank, 2, opts)


def _local_addr(server_addr: str) -> str:
    """This host's address on the route to the server (a UDP connect sends nothing)."""
    if server_addr in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1" if server_addr != "::1" else "::1"
    fam = socket.AF_INET6 if ":" in server_addr else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.connect((server_addr, 9))
        return s.getsockname()[0]

