"""Base weights streamed from host memory, one decoder layer at a time (`stream_base_weights=True`).

A QLoRA model's frozen NF4 base weights are most of its GPU memory: 3.4 GiB of an 8B model's 5.5 GiB
(the rest is the 16-bit embedding and head). They are read in a fixed order, layer after layer, forward
and backward, and never written. So here they live in pinned host memory, one buffer per decoder layer,
and the GPU holds two slots the size of one layer's packed bytes: layer i's weights are read from slot
i % 2. While layer i runs from one slot, layer i + 1 (or i - 1, going backward) is copied into the other
on a side stream; the compute stream waits for a copy only where it ran ahead of it.

How a layer's weights come to be in its slot. Every Linear4bit weight of a streamed layer is, for good,
a view into its layer's slot: the same storage and address on every call, so the caches keyed by address
(the dequantization's arguments) and CUDA graphs (fast_generate's decode step) stay valid. Its bytes are
only right while the slot holds its layer. Everything that reads NF4 bytes goes through
`base_weight.dense_weight` / `dequantize_into` (and bitsandbytes' own forward, for layers on PEFT's
unfused path), and those first call `ensure()` of the weight's layer, which
  - does nothing when that layer is the one ensured last on the same stream (the common case: seven
    projections a layer, forward, recompute and backward);
  - otherwise makes the compute stream wait for the slot's copy, issuing the copy first where the slot
    holds another layer; and starts copying the next layer in the direction of travel into the other
    slot, ordered after all work queued so far (which includes the last reads of that slot).
So the weights are right in any order of reads; the order decides only how much is copied. The copies
are ordered after an event on the compute stream: work queued on another stream that reads a slot must
be joined to the current stream first (as CUDA graph capture and fast_generate's warm-up do), and a
change of stream refills both slots rather than trusting copies ordered against the old one. A CUDA
graph's replays run the copies it captured without `ensure` seeing them: whoever replays one
(fast_generate's decode session) calls `forget_slots()` afterwards, and the next read refills.

The fills write the slot through its own tensor, so the views' version counters do not move: the version
is what tells fast_generate that a weight changed, and a streamed weight never does.

Cost: each layer's packed bytes cross PCIe once per forward and once per backward (an 8B layer is 105 MB).
Training steps overlap that with a layer's compute; a decode step cannot (its compute is well under a
millisecond a layer), so generation becomes bound by the copies. Measured on an H100 (bench_grpo.py,
2026-12-07): 71 ms a decode step of the 8B model, i.e. 32 x 105 MB at ~47 GB/s; a GRPO step at 8 x 1,024
tokens took 83.8 s at a 4.03 GiB peak, against 170.2 s at 9.73 GiB for TRL + PEFT + bitsandbytes.
"""

from __future__ import annotations

import functools

import torch

from loraforge._native import current_stream, stream_handle
from loraforge.models.architectures import decoder_layers
from loraforge.models.base_weight import _quant_state, layer_weight, packed_codes

_ALIGN = 256  # bytes: each weight's offset in a slot, so the kernels' 16-byte vector reads stay aligned


class _Slot:
    __slots__ = ("buffer", "filled", "holds")

    def __init__(self, buffer: torch.Tensor):
        self.buffer = buffer  # uint8, the largest layer's bytes
        self.holds = None  # index of the layer copied (or being copied) into it
        self.filled = torch.cuda.Event() if buffer.is_cuda else None  # recorded after that copy


class _EnsureLayer:
    """Stored on each streamed Linear4bit (`_loraforge_stream`): `ensure` of its layer, as a call, and where
    its bytes lie in that layer's host buffer and slot (`offset`)."""

    __slots__ = ("index", "offset", "streamer")

    def __init__(self, streamer: WeightStreamer, index: int, offset: int):
        self.streamer, self.index, self.offset = streamer, index, offset

    def __call__(self) -> None:
        self.streamer.ensure(self.index)


class WeightStreamer:
    """The host buffers, the two slots and the copy schedule of one model's streamed layers."""

    def __init__(self, layers: list[torch.nn.Module], device: torch.device | str | None = None, wrap: bool = False):
        self.layers = layers
        # When decoder layers that stay resident follow the streamed ones, the last streamed layer prefetches
        # the first (the next pass's first read) while those run.
        self.wrap = wrap
        self.linears = [[m for m in layer.modules() if _streamable(m)] for layer in layers]
        if not any(self.linears):
            raise ValueError("stream_base_weights needs NF4 (load_in_4bit=True) base weights in the decoder layers; "
                             "this model has none")  # fmt: skip
        first = next(m for group in self.linears for m in group)
        # The weights' device; `device` where the packed codes are still in host memory (a load that
        # quantized them there: from_pretrained with stream_base_weights).
        self.device = torch.device(device) if device is not None else packed_codes(layer_weight(first)).device
        cuda = self.device.type == "cuda"
        self.offsets, self.host = [], []
        for group in self.linears:
            offsets, size = [], 0
            for module in group:
                offsets.append(size)
                size += -(-packed_codes(layer_weight(module)).numel() // _ALIGN) * _ALIGN
            self.offsets.append(offsets)
            self.host.append(torch.empty(size, dtype=torch.uint8, pin_memory=cuda))
        slot_bytes = max(h.numel() for h in self.host)
        self.slots = [_Slot(torch.empty(slot_bytes, dtype=torch.uint8, device=self.device)) for _ in range(2)]
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.queued = torch.cuda.Event() if cuda else None  # marks the compute stream's work before a copy
        self.current = None  # (layer index, raw handle of the stream) last ensured
        self.direction = 1
        self.copies = 0  # layer copies into a slot so far (tests, benchmarks)
        self.hooks = []  # forward pre-hooks and state_dict hooks on the streamed Linear4bit modules
        for index, group in enumerate(self.linears):
            self._move_to_host(index, group)
        if cuda:
            torch.cuda.current_stream(self.device).synchronize()  # the host copies are done: the GPU ones may go

    def _move_to_host(self, index: int, group: list[torch.nn.Module]) -> None:
        """Copy the layer's packed weights into its host buffer and make each weight a view into its slot."""
        slot = self.slots[index % 2].buffer
        for module, offset in zip(group, self.offsets[index]):
            weight = layer_weight(module)
            packed = packed_codes(weight)
            self.host[index][offset : offset + packed.numel()].copy_(packed.reshape(-1), non_blocking=True)
            view = torch.empty(0, dtype=torch.uint8, device=self.device)
            view.set_(slot.untyped_storage(), offset, packed.shape, packed.stride())
            with torch._C.DisableTorchFunctionSubclass():
                weight.data = view
            module.__dict__["_loraforge_stream"] = _EnsureLayer(self, index, offset)
            module.__dict__.pop("_loraforge_dequant", None)  # its cached addresses are the old tensor's
            self.hooks.append(module.register_forward_pre_hook(_ensure_before_forward))
            self.hooks.append(module._register_state_dict_hook(_state_dict_from_host))
            module.__dict__["_apply"] = functools.partial(_apply_on_the_same_device, module, self)

    def ensure(self, index: int) -> None:
        """Make layer `index`'s weights readable, in stream order, by the next work on the current stream."""
        handle = stream_handle(self.device) if self.copy_stream is not None else None
        if self.current == (index, handle):
            return
        if self.current is not None:
            previous, previous_handle = self.current
            if previous_handle != handle:  # copies ordered against another stream: refill (module docstring)
                for slot in self.slots:
                    slot.holds = None
            if abs(index - previous) == 1:
                self.direction = index - previous
            elif index != previous:  # a new pass: the first layer goes forward, the last backward
                self.direction = 1 if 2 * index < len(self.layers) else -1
        self.current = (index, handle)
        stream = current_stream(self.device) if handle is not None else None
        slot = self.slots[index % 2]
        if slot.holds != index:
            self._fill(slot, index, stream)
        if stream is not None:
            stream.wait_event(slot.filled)
        following = index + self.direction
        if (
            following == len(self.layers)
            and self.wrap
            and not (stream is not None and torch.cuda.is_current_stream_capturing())
        ):
            following = 0  # (not into a CUDA graph: a copy the captured step does not wait for fails the capture)
        if 0 <= following < len(self.layers) and self.linears[following]:
            other = self.slots[following % 2]
            if other is not slot and other.holds != following:  # (never the slot being read: odd counts wrap onto it)
                self._fill(other, following, stream)

    def join_copies(self) -> None:
        """Order the current stream after every copy issued so far. Before a CUDA graph replay: the graph's
        own copies into a slot are ordered only within the graph, not after a prefetch the last eager pass
        left in flight into the same slot (partial streaming's wrap-around prefetch of layer 0)."""
        if self.copy_stream is not None:
            current_stream(self.device).wait_stream(self.copy_stream)

    def forget_slots(self) -> None:
        """The slots' contents are no longer what the schedule last recorded: a CUDA graph's captured copies
        ran (fast_generate's replays), which `ensure` does not see. A replay leaves the slots as the captured
        step's copies did, which is not where an eager pass leaves them when that pass ends with the
        wrap-around prefetch (partial streaming) or stops early; so the next `ensure` refills rather than
        trusting either. Costs at most two layer copies per generation."""
        self.current = None
        for slot in self.slots:
            slot.holds = None

    def _fill(self, slot: _Slot, index: int, stream) -> None:
        """Copy layer `index` into `slot` after everything queued on `stream` so far."""
        slot.holds = index
        self.copies += 1
        source = self.host[index]
        if stream is None:
            slot.buffer[: source.numel()].copy_(source)
            return
        self.queued.record(stream)
        self.copy_stream.wait_event(self.queued)
        with torch.cuda.stream(self.copy_stream):
            slot.buffer[: source.numel()].copy_(source, non_blocking=True)
        slot.filled.record(self.copy_stream)

    def host_weight(self, module: torch.nn.Module) -> torch.Tensor:
        """The packed bytes of a streamed Linear4bit, as they are kept in host memory (shaped as the weight)."""
        place = module.__dict__.get("_loraforge_stream")
        if place is None or place.streamer is not self:
            raise KeyError("not a streamed layer of this model")
        packed = packed_codes(layer_weight(module))
        raw = self.host[place.index][place.offset : place.offset + packed.numel()]
        return raw.view(packed.dtype).view(packed.shape)

    def unstream(self) -> None:
        """Give every weight its own device tensor again (the memory of all layers at once)."""
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        for index, group in enumerate(self.linears):
            for module in group:
                weight = layer_weight(module)
                resident = self.host_weight(module).to(self.device, copy=True)
                with torch._C.DisableTorchFunctionSubclass():
                    weight.data = resident
                module.__dict__.pop("_loraforge_stream", None)
                module.__dict__.pop("_loraforge_dequant", None)
                module.__dict__.pop("_apply", None)
        for hook in self.hooks:
            hook.remove()
        self.hooks, self.current = [], None
        for slot in self.slots:
            slot.holds = None


def _streamable(module: torch.nn.Module) -> bool:
    """A bitsandbytes NF4 Linear4bit (the module whose own parameter the weight is, not PEFT's wrapper of
    the same name) whose packed codes are plain contiguous bytes."""
    if type(module).__name__ != "Linear4bit" or "weight" not in module._parameters or _quant_state(module) is None:
        return False
    packed = packed_codes(layer_weight(module))
    return packed.dtype == torch.uint8 and packed.is_contiguous()


def _apply_on_the_same_device(module: torch.nn.Module, streamer: WeightStreamer, fn, recurse: bool = True):
    """nn.Module._apply of a streamed model and of its streamed Linear4bit modules (module.to / .cuda / .cpu /
    .half reach it): a move to another device would copy the slots' bytes, whichever layers they hold, so
    it is refused before anything moves (the model's own _apply checks first); a dtype change, or a move to
    where the weights already are, goes ahead."""
    device = streamer.slots[0].buffer.device
    if fn(torch.empty(0, device=device)).device != device:
        raise NotImplementedError("moving streamed base weights (stream_base_weights) to another device is not "
                                  "supported: call loraforge.unstream_base_weights(model) first")  # fmt: skip
    return type(module)._apply(module, fn, recurse)


def _ensure_before_forward(module, args) -> None:
    """bitsandbytes' own forward (layers on PEFT's unfused path) reads the weight too."""
    ensure = module.__dict__.get("_loraforge_stream")
    if ensure is not None:
        ensure()


def _state_dict_from_host(module, state_dict, prefix, local_metadata) -> None:
    """state_dict() of a streamed Linear4bit: its weight's bytes from host memory, not the slot's."""
    ensure = module.__dict__.get("_loraforge_stream")
    key = prefix + "weight"
    if ensure is not None and key in state_dict:
        state_dict[key] = ensure.streamer.host_weight(module)


def _refuse_merge(*args, **kwargs):
    raise NotImplementedError("merging adapters into streamed base weights (stream_base_weights=True) is not "
                              "supported: call loraforge.unstream_base_weights(model) first")  # fmt: skip


def guard_merges(model: torch.nn.Module) -> None:
    """PEFT's merge / unmerge of a LoRA layer over a streamed weight would read and replace the slot's
    bytes directly: refused on each such layer (this instance only) with a clear error."""
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, torch.nn.Module) and "_loraforge_stream" in base.__dict__:
            for name in ("merge", "unmerge"):
                if hasattr(module, name):
                    module.__dict__[name] = _refuse_merge


def _allow_merges(model: torch.nn.Module) -> None:
    for module in model.modules():
        if module.__dict__.get("merge") is _refuse_merge:
            del module.__dict__["merge"]
        if module.__dict__.get("unmerge") is _refuse_merge:
            del module.__dict__["unmerge"]


def stream_base_weights(model: torch.nn.Module, device: torch.device | str | None = None,
                        layers: int | None = None) -> WeightStreamer:  # fmt: skip
    """Keep `model`'s NF4 base weights in pinned host memory and stream them to the GPU a decoder layer at a
    time (see the module docstring). Returns the streamer, which the model also keeps
    (`model._loraforge_weight_streamer`). Undo with `unstream_base_weights(model)`. `device`: the GPU the
    slots go on, where the packed codes are still in host memory (default: where they are). `layers`: stream
    only the first this many decoder layers, the others stay on the GPU (default: all): fewer copies, for
    the memory that is there (each resident layer adds its bytes, an 8B model's ~105 MB)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    existing = streamer_of(model)
    if existing is not None:
        if layers is not None and layers != len(existing.layers):
            raise ValueError(f"this model streams {len(existing.layers)} layers already; call "
                             "unstream_base_weights(model) before streaming another number")  # fmt: skip
        return existing
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise NotImplementedError("stream_base_weights with torch.distributed (DDP/FSDP2) is not supported")
    decoder = decoder_layers(model)
    if not decoder:
        raise ValueError("stream_base_weights found no decoder layers in this model (transformers' "
                         "GradientCheckpointingLayer modules)")  # fmt: skip
    if layers is not None and (
        isinstance(layers, bool) or not isinstance(layers, int) or not 0 < layers <= len(decoder)
    ):
        raise ValueError(f"the number of streamed layers (stream_base_weights=N) must be an int from 1 to the model's "
                         f"{len(decoder)} decoder layers, got {layers!r}")  # fmt: skip
    count = len(decoder) if layers is None else layers
    streamer = WeightStreamer(decoder[:count], device, wrap=count < len(decoder))
    model.__dict__["_loraforge_weight_streamer"] = streamer
    model.__dict__["_apply"] = functools.partial(_apply_on_the_same_device, model, streamer)
    guard_merges(model)
    return streamer


def unstream_base_weights(model: torch.nn.Module) -> None:
    """Undo stream_base_weights: every base weight resident on its device again (a PEFT model wrapping the
    streamed model will do)."""
    for module in (model, *model.modules()):
        streamer = module.__dict__.pop("_loraforge_weight_streamer", None)
        if streamer is not None:
            module.__dict__.pop("_apply", None)
            streamer.unstream()
            _allow_merges(model)
            return


def streamer_of(model: torch.nn.Module) -> WeightStreamer | None:
    """The streamer of `model` or of a model it wraps (a PEFT model), or None."""
    for module in (model, *model.modules()):
        streamer = module.__dict__.get("_loraforge_weight_streamer")
        if streamer is not None:
            return streamer
    return None
