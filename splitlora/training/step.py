"""The split step, written once: device forward -> smashed data on the wire -> server forward, loss, backward ->
gradient back -> device backward. The in-process trainer, both distributed roles, evaluation and the measurement
all run these halves; only what carries the message between them differs.

Source: docs/split-training.md, "Split training".
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from splitlora.training.split import DevicePart, ServerPart, compute_context, tensor_bytes


@dataclass
class SmashedData:
    """The message device -> server: ``hidden`` (B, s, H) in the wire dtype, ``labels`` (B, s) int64 and the
    optional 2-D padding mask (B, s). Its byte counts are the wire's (unit: byte)."""

    hidden: torch.Tensor
    labels: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    @property
    def smashed_bytes(self) -> int:
        """Bytes of the hidden state alone: B s H x bytes per wire element."""
        return tensor_bytes(self.hidden)

    @property
    def nbytes(self) -> int:
        """Bytes of everything in the message (hidden state, labels, mask)."""
        return tensor_bytes(self.hidden) + tensor_bytes(self.labels) + tensor_bytes(self.attention_mask)


def to_wire(hidden: torch.Tensor, wire_dtype: torch.dtype, labels: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None) -> SmashedData:
    """Detach ``hidden`` (B, s, H) and cast it to ``wire_dtype``; labels and mask are sent as they are."""
    return SmashedData(hidden.detach().to(wire_dtype), labels, attention_mask)


def apply_optimizer(optimizer) -> None:
    """One step of ``optimizer`` (None: nothing), gradients then cleared (set to None)."""
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


class DeviceHalf:
    """The device's half of one mini-batch on ``part`` (a :class:`~splitlora.training.split.DevicePart`).

    :meth:`forward` runs embedding + units 1..c under ``compute_dtype`` and returns the :class:`SmashedData` to send
    (None at c = L, where the device computes the loss itself: :attr:`loss`); :meth:`backward` applies the gradient
    the server sent back. ``needs_gradient`` is False when no device-side parameter is trainable (e.g. c = 0): then
    the server computes no input gradient and sends none.
    """

    def __init__(self, part: DevicePart, wire_dtype: torch.dtype, compute_dtype: str = "float32"):
        self.part, self.wire, self.compute_dtype = part, wire_dtype, compute_dtype
        self.hidden: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> SmashedData | None:
        """``input_ids``, ``labels``: (B, s) int64; ``attention_mask``: (B, s) or None (not sent)."""
        with compute_context(self.compute_dtype, input_ids.device.type):
            out = self.part(input_ids, attention_mask)
            if self.part.is_full:
                self.hidden, self.loss = None, self.part.loss(out, labels)
                return None
        self.hidden, self.loss = out, None
        return to_wire(out, self.wire, labels, attention_mask)

    @property
    def needs_gradient(self) -> bool:
        """Whether the server must send the gradient of the smashed data back."""
        return self.hidden is not None and self.hidden.requires_grad

    def backward(self, gradient: torch.Tensor | None = None, optimizer=None) -> None:
        """Backward of the device part from the loss (c = L) or from ``gradient`` (B, s, H) of the smashed data, then
        one step of ``optimizer`` (if given). Raises ValueError if a needed gradient is missing."""
        if self.loss is not None:
            self.loss.backward()
        elif self.needs_gradient:
            if gradient is None:
                raise ValueError("gradient=None is invalid: the device part has trainable parameters, so the "
                                 "server must send the gradient of the smashed data")
            self.hidden.backward(gradient.to(self.hidden.device, self.hidden.dtype))
        self.hidden = None
        apply_optimizer(optimizer)


class ServerHalf:
    """The server's half of one mini-batch on ``part`` (a :class:`~splitlora.training.split.ServerPart`): units
    c+1..L, norm, head and loss on the received smashed data, then the gradient to send back in the wire dtype.
    The hidden state is cast back to the dtype of the server's weights (fp32 residual stream) on their device."""

    def __init__(self, part: ServerPart, wire_dtype: torch.dtype, compute_dtype: str = "float32"):
        self.part, self.wire, self.compute_dtype = part, wire_dtype, compute_dtype
        w = next(part.parameters(), None)  # none at c = L, where the server half is not used
        self.device = torch.device("cpu") if w is None else w.device
        self.dtype = torch.float32 if w is None else w.dtype
        self.input: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None

    def forward(self, message: SmashedData, needs_gradient: bool) -> torch.Tensor:
        """Loss (scalar) of the server part on ``message``; ``needs_gradient``: keep the input gradient."""
        x = message.hidden.to(self.device, self.dtype).requires_grad_(needs_gradient)
        labels = message.labels.to(self.device)
        am = None if message.attention_mask is None else message.attention_mask.to(self.device)
        with compute_context(self.compute_dtype, self.device.type):
            self.loss = self.part.loss(self.part(x, am), labels)
        self.input = x
        return self.loss

    def backward(self, optimizer=None) -> torch.Tensor | None:
        """Backward from the loss and one step of ``optimizer`` (if given); returns the gradient of the smashed data
        (B, s, H) in the wire dtype, or None when the device did not need it."""
        self.loss.backward()
        apply_optimizer(optimizer)
        x, self.input = self.input, None
        return x.grad.to(self.wire) if x.requires_grad else None


@dataclass
class StepResult:
    """One split step: loss (float), the smashed data sent (None at c = L), the gradient sent back (None at c = L or
    when the device has nothing to train), and the seconds each side computed (this host's clock)."""

    loss: float
    smashed: SmashedData | None
    gradient: torch.Tensor | None
    device_time_s: float
    server_time_s: float

    @property
    def bytes_up(self) -> int:
        """Bytes device -> server (smashed data + labels (+ mask))."""
        return 0 if self.smashed is None else self.smashed.nbytes

    @property
    def bytes_down(self) -> int:
        """Bytes server -> device (the gradient)."""
        return tensor_bytes(self.gradient)


def split_step(device: DeviceHalf, server: ServerHalf | None, input_ids: torch.Tensor, labels: torch.Tensor,
               attention_mask: torch.Tensor | None = None, *, device_optimizer=None,
               server_optimizer=None) -> StepResult:
    """One training step of split learning in one process, the two halves joined by the message alone: device
    forward, server forward + backward (+ ``server_optimizer`` step), device backward (+ ``device_optimizer`` step).
    ``input_ids``, ``labels``, ``attention_mask``: (B, s). ``server`` may be None at c = L."""
    t0 = time.perf_counter()
    msg = device.forward(input_ids, labels, attention_mask)
    grad, t_srv = None, 0.0
    if msg is None:
        loss = device.loss
    else:
        t1 = time.perf_counter()
        loss = server.forward(msg, device.needs_gradient)
        grad = server.backward(server_optimizer)
        t_srv = time.perf_counter() - t1
    device.backward(grad, device_optimizer)
    return StepResult(float(loss.detach()), msg, grad, time.perf_counter() - t0 - t_srv, t_srv)


def split_forward(device: DevicePart, server: ServerPart, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, wire_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits (B, s, V) of the split model: device forward, cast to the wire dtype, server forward."""
    h = device(input_ids, attention_mask)
    if device.is_full:
        return h
    return server(to_wire(h, wire_dtype).hidden.to(h.dtype), attention_mask)
