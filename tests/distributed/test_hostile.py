"""Hostile peers against the distributed server, in one process (server and device in threads, TCP on 127.0.0.1):
short, long, corrupted, oversized, out-of-order and non-finite messages, trailing bytes, a wrong secret, an unknown
or duplicate device identity, a TCPStore client tampering on the server's port. Each is refused with an event, the
server never crashes, the device rejoins at once, and the adapter equals the in-process reference (issue 11)."""
from __future__ import annotations

import concurrent.futures as cf
import datetime
import json
import re
import socket
import struct
import threading
import time
import zlib

import pytest
import torch

from splitlora.distributed import config, plan, roles, wire
from tests.distributed.harness import SECRET, base_config

TIMEOUT_S = 3.0


def _cfg(tmp_path, **over):
    d = base_config(tmp_path, **{"rounds": 1, "cut": [[1]], **over})
    d["dist"].update(timeout_s=TIMEOUT_S, join_timeout_s=TIMEOUT_S + 1, startup_timeout_s=20, idle_timeout_s=20,
                     retries=1)
    d["dist"].pop("checkpoint_dir")  # checkpoints on by default: <output_dir>/checkpoint
    return d


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The in-process adapter of the run every test here makes (1 device, 1 round, 2 mini-batches, cut 1)."""
    cfg = config.config_from_dict(_cfg(tmp_path_factory.mktemp("ref")))
    return plan.run_in_process(cfg).adapter_state()


def _run(cfg_dict, hostile_link=None, before_device=None, on_event=None):
    """Run the server and device 0 in threads; ``hostile_link``: a Link subclass the device uses on its first
    connection. Returns (server, summary or the server's exception, device exit code)."""
    cfg = config.config_from_dict(cfg_dict)
    server, device = roles.Server(cfg), roles.Device(cfg, 0)
    orig, made = roles.Link, []

    def link(sock, *a, **kw):  # the device's links (peer 0): its first one is the hostile one
        if hostile_link is not None and kw.get("peer") == 0 and not made:
            made.append(hostile_link)
            return hostile_link(sock, *a, **kw)
        return orig(sock, *a, **kw)

    if on_event is not None:
        event = server.event

        def hooked(kind, **kw):
            event(kind, **kw)
            on_event(server, kind, kw)
        server.event = hooked
    roles.Link = link
    try:
        with cf.ThreadPoolExecutor(2) as ex:
            fs = ex.submit(_serve, server)
            deadline = time.monotonic() + 20
            while not any(e["event"] == "listening" for e in server.events) and time.monotonic() < deadline:
                time.sleep(0.02)
            if before_device is not None:
                before_device(server)
            fd = ex.submit(device.serve)
            result, code = fs.result(60), fd.result(60)
    finally:
        roles.Link = orig
    return server, result, code


def _serve(server):
    try:
        return server.serve()
    except roles.RunIncomplete as err:
        return err


def _events(server, kind):
    return [e for e in server.events if e["event"] == kind]


def _assert_trained_as_reference(server, result, code, reference):
    assert isinstance(result, dict) and result["steps"] == server.total_steps and code == 0, (result, server.events)
    adapter = torch.load(server.out / "adapter.pt", weights_only=True)
    assert set(adapter) == set(reference)
    for k in reference:
        torch.testing.assert_close(adapter[k], reference[k], rtol=0, atol=1e-6)


def raw_send(link: wire.Link, payload: bytes, key: int, code: int, shape, nbytes=None, crc=None, seq=None):
    """A message with any header fields: what a hostile peer can put on the wire."""
    dims = list(shape) + [0] * (wire.MAX_DIMS - len(shape))
    head = wire.HEADER.pack(wire.MAGIC, wire.VERSION, code, len(shape), link.sent if seq is None else seq, key,
                            *dims, len(payload) if nbytes is None else nbytes,
                            zlib.crc32(payload) if crc is None else crc)
    link.sent += 1
    link.sock.sendall(head + struct.pack("<I", zlib.crc32(head)) + payload)


def _bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _hostile(target_key, act):
    """A device Link that does ``act(link, tensor, key)`` instead of sending the first message of ``target_key``."""
    class Hostile(wire.Link):
        done = False

        def send(self, t, key, rate_bps=0.0):
            if key == target_key and not Hostile.done:
                Hostile.done = True
                act(self, t.detach().cpu(), key)
                return t.numel() * t.element_size()
            return super().send(t, key, rate_bps)
    return Hostile


def _short(link, t, key):  # announces every byte, sends half
    b = _bytes(t)
    raw_send(link, b[:len(b) // 2], key, wire.DTYPES.index(t.dtype), t.shape, nbytes=len(b), crc=zlib.crc32(b))


def _long(link, t, key):  # defect 5: announces n bytes, sends n + 2048
    b = _bytes(t)
    raw_send(link, b + b"\x00" * 2048, key, wire.DTYPES.index(t.dtype), t.shape, nbytes=len(b), crc=zlib.crc32(b))


def _corrupted(link, t, key):  # one bit flipped after the checksum was computed
    b = bytearray(_bytes(t))
    crc = zlib.crc32(b)
    b[len(b) // 3] ^= 0x10
    raw_send(link, bytes(b), key, wire.DTYPES.index(t.dtype), t.shape, crc=crc)


def _oversized(link, t, key):  # a shape of 2^40 elements, byte count consistent with it
    shape = (1 << 20, 1 << 20, t.shape[-1])
    raw_send(link, b"", key, wire.DTYPES.index(t.dtype), shape, nbytes=(1 << 40) * t.shape[-1] * t.element_size())


def _replayed(link, t, key):  # the same message twice under one sequence number
    wire.Link.send(link, t, key)
    raw_send(link, _bytes(t), key, wire.DTYPES.index(t.dtype), t.shape, seq=link.sent - 1)


def _swapped(link, t, key):  # out of order: a gradient-keyed message where the smashed data belongs
    wire.Link.send(link, t, wire.K_GRAD)


def _nan(link, t, key):
    bad = t.clone()
    bad.view(-1)[5] = float("nan")
    wire.Link.send(link, bad, key)


def _labels_out_of_range(link, t, key):
    wire.Link.send(link, torch.full_like(t, 10**6), key)


def _trailing(link, t, key):  # a well-formed adapter blob with bytes nobody asked for behind it
    b = _bytes(t)
    raw_send(link, b + b"\x01" * 64, key, wire.DTYPES.index(t.dtype), t.shape, nbytes=len(b), crc=zlib.crc32(b))


HOSTILE_MESSAGES = {  # name: (message key, act, what the turn_failed event says)
    "short": (wire.K_HIDDEN, _short, "checksum|no message within|closed"),
    "long": (wire.K_HIDDEN, _long, "bad header"),
    "corrupted": (wire.K_HIDDEN, _corrupted, "checksum"),
    "oversized": (wire.K_HIDDEN, _oversized, "smashed data of shape"),
    "replayed": (wire.K_HIDDEN, _replayed, "out of order"),
    "out_of_order": (wire.K_HIDDEN, _swapped, "message key"),
    "non_finite": (wire.K_HIDDEN, _nan, "not finite"),
    "labels": (wire.K_LABELS, _labels_out_of_range, "labels outside"),
    "short_adapter": (wire.K_ADAPTER, _short, "checksum|no message within|closed"),
    "trailing_bytes": (wire.K_ADAPTER, _trailing, "beyond the turn's last message"),
}


@pytest.mark.parametrize("name", list(HOSTILE_MESSAGES))
def test_hostile_message_fails_the_turn_and_never_reaches_the_optimiser(name, tmp_path, monkeypatch, reference):
    key, act, error = HOSTILE_MESSAGES[name]
    monkeypatch.setenv(wire.SECRET_ENV, SECRET)
    server, result, code = _run(_cfg(tmp_path), hostile_link=_hostile(key, act))
    failed = _events(server, "turn_failed")
    assert len(failed) == 1 and pytest.approx(0) == failed[0]["attempt"], server.events
    assert re.search(error, failed[0]["error"]), failed[0]["error"]
    # the pair was closed: the device rejoined at once, not after its own timeout_s, and the retry trained
    rejoin = [e for e in _events(server, "joined") if e["gen"] == 2]
    assert rejoin and rejoin[0]["time"] - failed[0]["time"] < 0.8 * TIMEOUT_S, server.events
    _assert_trained_as_reference(server, result, code, reference)
    # checkpoints by default, the server's logs appended beside a server.pt that does not hold them
    ck = server.out / "checkpoint"
    st = torch.load(ck / "server.pt", weights_only=True)
    assert "logs" not in st and "events" not in st and st["n_logs"] == 2
    assert len((ck / "server.logs.jsonl").read_text().splitlines()) == 2
    assert (ck / "device0.pt").exists()


def _client(port, secret, index, fingerprint, out, name):
    """A process speaking the protocol: join as ``index`` with ``secret``; records the server's answer code."""
    try:
        link = wire.Link(socket.create_connection(("127.0.0.1", port), timeout=10), 10, peer=0)
        try:
            out[name] = wire.device_handshake(link, secret, [index, fingerprint, -1, 0], (1e12, 8e9))[0]
        finally:
            link.close()
    except (RuntimeError, OSError) as err:
        out[name] = repr(err)


def _tamper_store(port, out):
    """The attack of defect 6: a TCPStore client bumping a device's join counter on the server's port."""
    try:
        store = torch.distributed.TCPStore("127.0.0.1", port, None, False, datetime.timedelta(seconds=2),
                                           wait_for_workers=False)
        out["store"] = [store.add("splitlora/join/0", 1) for _ in range(3)]
    except (RuntimeError, OSError, ValueError) as err:
        out["store"] = repr(err)


def _garbage(port, out):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(bytes(range(256)) * 2)
        try:
            out["garbage"] = s.recv(4096)[:0] + s.recv(4096)  # the server's challenge, then its close
        except OSError as err:
            out["garbage"] = repr(err)


def test_strangers_wrong_secrets_duplicates_and_store_tampering_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(wire.SECRET_ENV, SECRET)
    d = _cfg(tmp_path, rounds=2, cut=[[1], [2]])
    cfg = config.config_from_dict(d)
    ref = plan.run_in_process(cfg).adapter_state()
    port, fp, out, threads = d["dist"]["port"], cfg.fingerprint(), {}, []

    def spawn(target, *args):
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        threads.append(t)

    def strangers(server):  # all before the real device: the server meets them first
        spawn(_client, port, b"not-the-secret-at-all-0000", 0, fp, out, "wrong_secret")
        spawn(_client, port, SECRET.encode(), 7, fp, out, "unknown_index")
        spawn(_client, port, SECRET.encode(), 0, fp + 1, out, "other_config")
        spawn(_tamper_store, port, out)
        spawn(_garbage, port, out)
        time.sleep(0.5)

    def duplicate(server, kind, kw):  # a second process claims device 0 while it is connected
        if kind == "turn_done" and "duplicate" not in out:
            out["duplicate"] = None
            spawn(_client, port, SECRET.encode(), 0, fp, out, "duplicate")
            time.sleep(0.3)

    server, result, code = _run(d, before_device=strangers, on_event=duplicate)
    for t in threads:
        t.join(20)
    refused = {e.get("reason", "")[:40]: e for e in _events(server, "join_refused")}
    reasons = " | ".join(refused)
    assert out["wrong_secret"] == wire.UNAUTHENTICATED and "authentication failed" in reasons, reasons
    assert out["unknown_index"] == wire.REFUSED and "unknown device index 7" in reasons, reasons
    assert out["other_config"] == wire.REFUSED and "configuration fingerprint" in reasons, reasons
    assert out["duplicate"] == wire.DUPLICATE and "device 0 is already connected" in reasons, reasons
    assert isinstance(out["store"], str), out  # the store protocol gets nowhere: no counter was bumped
    failed = _events(server, "join_failed")
    assert len(failed) >= 2, server.events  # the store client and the garbage
    # the real device was never knocked out: one join, no failed or skipped turn, the reference adapter
    assert [e["gen"] for e in _events(server, "joined")] == [1], server.events
    assert not _events(server, "turn_failed") and not _events(server, "skipped")
    _assert_trained_as_reference(server, result, code, ref)
    assert json.loads((server.out / "events.json").read_text())[-1]["event"] == "turn_done"
