"""use_gradient_checkpointing="unsloth": checkpoint every decoder layer, and keep the one tensor
each layer saves (its input) in pinned CPU memory rather than on the GPU until backward.

Non-reentrant `torch.utils.checkpoint` saves only a layer's inputs and recomputes the layer in
backward. Around it, saved-tensor hooks move what is saved to pinned host memory:

* pack (forward): the copy to host runs on a side stream, ordered after the work that produced
  the tensor, so the compute stream never waits for PCIe; the GPU tensor is kept alive only until
  that copy has finished (an event), and then released.
* unpack (backward): backward visits the layers in reverse, so when layer i asks for its input we
  also start copying layer i-1's input back on the side stream (prefetch); by the time layer i's
  backward is done, the next input is on the GPU and the compute stream only waits on an event.
  Without the prefetch each layer's backward would first stall on a PCIe copy (32 MiB per layer of
  an 8B model at 2 x 2,048 tokens: ~1.3 ms, ~40 ms a step) -- measured on an H100.

PyTorch's `save_on_cpu` does the same without the side stream: its device-to-host copy is
synchronous and stalls the GPU at every layer. On a CPU model there is nothing to offload and
this is plain checkpointing.

The layer itself goes through one autograd.Function (`_CheckpointedLayer`, the "reentrant" form
of checkpointing) rather than torch's non-reentrant `checkpoint`: its forward runs the layer with
autograd off (no graph, no saved-tensor bookkeeping) and keeps only the offloaded input; its
backward restores the input, reruns the layer with autograd on and backpropagates through that.
The 8B training step is bound by the host as much as by the GPU, and torch's checkpoint machinery
cost ~1.3 ms of host time at each layer boundary in forward and ~1 ms at each in backward on the
H200's host (benchmarks/memory_phases.py, 2026-12-03). Where the Function cannot stand in for
torch's checkpoint (under torch.distributed, where DDP's and FSDP's gradient hooks expect the
non-reentrant form; torch.compile tracing; a layer input given by keyword; a keyword tensor that
requires grad) torch's checkpoint runs, with the offload hooks. A layer that returns something other
than tensors is refused with a TypeError.
Random state (CPU and the layer's device) is saved and restored around the recompute, as torch
does, only when the layer holds a dropout with p > 0 in training mode.
"""

from __future__ import annotations

import contextlib
import os
import weakref

import torch
from torch.utils.checkpoint import checkpoint

from loraforge._native import current_stream
from loraforge.train import copy_pacing, kept_layer_budget, layer_split

_MIN_OFFLOAD_BYTES = 1 << 20  # small tensors (masks, positions) are not worth a round trip

# At most this many saved tensors wait on the GPU for their copy to host. Where the host runs ahead of
# the GPU (an 8B forward: ~2.3 ms of host time a layer against ~3.4 ms of GPU time) every layer it is
# ahead keeps one more input alive: 12 by the last layer of the 8B forward, 0.39 GiB at the forward's
# memory peak (benchmarks/memory_phases.py, H100, 2026-12-07). Four (two layers checkpointed in halves)
# still leave the GPU two layers of queued work.
MAX_IN_FLIGHT = int(os.environ.get("LORAFORGE_OFFLOAD_IN_FLIGHT", "4") or 4)
# Before the first layer that runs without a checkpoint (KEEP_LAST_LAYERS), wait for the copies still in
# flight (all but the newest, which backward takes first): the activations of those layers, then the loss,
# are where the forward's memory peaks, and the queue's GPU tensors would otherwise add to it. The copies
# were issued a layer or more earlier, so the wait is short. LORAFORGE_OFFLOAD_DRAIN_BEFORE_KEPT=0 turns it off.
DRAIN_BEFORE_KEPT = os.environ.get("LORAFORGE_OFFLOAD_DRAIN_BEFORE_KEPT", "1") != "0"
# Past that limit the compute stream, not the host, waits for the oldest copy: its GPU tensor goes back to the
# allocator at once, and whatever reuses the block runs on the compute stream after the wait, so after the copy
# has read it. The host keeps its lead over the GPU, which a host wait gave up at every layer: the forward
# then ran at the host's pace where the host is slower than the GPU (an H100 host of 2026-12-07 whose steps
# spread over 363-430 ms, where another gave 328-349 ms). LORAFORGE_OFFLOAD_HOST_WAIT=1 waits on the host.
HOST_WAIT = os.environ.get("LORAFORGE_OFFLOAD_HOST_WAIT", "0") == "1"
# Experiment, off by default: LORAFORGE_OFFLOAD_REAP_DONE=0 stops releasing GPU tensors whose copy has been
# seen complete (`event.query()`, which depends on how far the GPU has got): exactly MAX_IN_FLIGHT then stay
# alive in the forward, and every release happens at the same point of the host's program in every step, so
# the caching allocator sees the same sequence of allocations and frees each step. With the query it did
# not, and new segments were still being allocated after the warmup steps (26 in 5 steps, H100, 5b14231).
REAP_DONE = os.environ.get("LORAFORGE_OFFLOAD_REAP_DONE", "1") != "0"
# Experiment, off by default: LORAFORGE_OFFLOAD_PREFETCH_ON_COMPUTE=1 takes a prefetched tensor's block from
# the compute stream's pool instead of the side stream's. The side stream's block is read by the compute
# stream, so it is handed over with record_stream, and when freed it goes back to the pool only once the
# allocator sees an event recorded at the free complete: the further the host is ahead of the GPU, the more
# such blocks are pending and the more new segments a prefetch needs (the allocator still grew during the
# timed steps, and more so once the host was allowed to run ahead: 26 new segments against 2 with the host
# wait, H100, 5b14231). A compute-stream block is reused in stream order with nothing to poll; the side
# stream then must not write it before the compute stream's work queued so far, which may still read the
# block's previous tensor, is done (it waits for the compute stream first). The price: a copy back can then
# start only once the GPU reaches the layer whose restore issued it, one layer before it is needed, where a
# side-stream block let it start as soon as the side stream was free (a layer's inputs and kept products are
# ~150 MB of an 8B model at 4k tokens: ~3 ms at 55 GB/s, against ~4 ms of that layer's backward).
PREFETCH_ON_COMPUTE = os.environ.get("LORAFORGE_OFFLOAD_PREFETCH_ON_COMPUTE", "0") == "1"
# How many links down the chain a restore starts copies back (LORAFORGE_OFFLOAD_PREFETCH_DEPTH, default 1: the
# next layer's). Experiment: 2 gives each copy two layers of backward to hide behind, for one more layer's
# inputs and kept products on the GPU (~150 MB of an 8B model at 4k tokens), the complement of
# PREFETCH_ON_COMPUTE, whose copies cannot start before the GPU reaches the issuing layer.
PREFETCH_DEPTH = max(1, int(os.environ.get("LORAFORGE_OFFLOAD_PREFETCH_DEPTH", "1") or 1))


class _Offloaded:
    __slots__ = ("__weakref__", "device", "done", "fetched", "fetched_event", "fetched_on", "gpu", "host", "prev", "then",
                 "version")  # fmt: skip

    def __init__(self, tensor: torch.Tensor, side: torch.cuda.Stream, prev: _Offloaded | None, timed: bool = False):
        self.device = tensor.device
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
        side.wait_stream(current_stream(tensor.device))
        with torch.cuda.stream(side):
            if timed:  # a forward that copy_pacing measures: the copy between two timing events
                start = torch.cuda.Event(enable_timing=True)
                start.record(side)
            self.host.copy_(tensor, non_blocking=True)
            self.done = torch.cuda.Event(enable_timing=timed)
            self.done.record(side)
        if timed:
            copy_pacing.PACING.record(start, self.done, tensor.numel() * tensor.element_size(), tensor.device)
        self.gpu = tensor  # alive until the copy completes (see _reap)
        self.version = tensor._version  # an in-place change after this is not in the host copy
        # The tensor saved just before this one (a weak link: a graph that is dropped unused must not
        # keep its predecessors' host buffers alive); backward will ask for it next.
        self.prev = weakref.ref(prev) if prev is not None else None
        self.then = ()  # weak links to more items to prefetch after prev (kept products: _pack_split_layer)
        self.fetched = self.fetched_event = self.fetched_on = None

    def prefetch(self, side: torch.cuda.Stream) -> None:
        """Start the copy back to the GPU on the side stream (once)."""
        if self.fetched is not None or self.host is None:
            return
        compute = current_stream(self.device)
        side.wait_event(self.done)
        if PREFETCH_ON_COMPUTE:
            fetched = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)  # (compute's pool)
            side.wait_stream(compute)
            with torch.cuda.stream(side):
                fetched.copy_(self.host, non_blocking=True)
                self.fetched_event = torch.cuda.Event()
                self.fetched_event.record(side)
            self.fetched, self.fetched_on = fetched, compute  # (the stream whose pool holds the block)
            return
        with torch.cuda.stream(side):
            self.fetched = self.host.to(self.device, non_blocking=True)
            self.fetched_event = torch.cuda.Event()
            self.fetched_event.record(side)
        self.fetched.record_stream(compute)

    def __del__(self):
        # A prefetched tensor from the compute stream's pool that is dropped unrestored (a backward that
        # raised, a graph freed unused): its block may be reused on the compute stream at once, so the
        # compute stream first waits for the copy still writing it.
        # (getattr: an __init__ that raised leaves the slots unset; the stream saved at the prefetch, not the
        # current one, which may be another when the collector runs this)
        fetched_on = getattr(self, "fetched_on", None)
        if fetched_on is not None and self.fetched is not None:
            with contextlib.suppress(Exception):  # (at interpreter shutdown: nothing will reuse the block)
                fetched_on.wait_event(self.fetched_event)

    def restore(self, side: torch.cuda.Stream) -> torch.Tensor:
        compute = current_stream(self.device)
        if self.gpu is not None and self.gpu._version == self.version:  # still held (the newest): no copy back
            compute.wait_event(self.done)  # (its memory is reused only after the copy to host has read it)
            tensor = self.gpu
        elif self.fetched is None:
            compute.wait_event(self.done)
            tensor = self.host.to(self.device, non_blocking=True)
        else:
            compute.wait_event(self.fetched_event)
            tensor = self.fetched
        self.gpu = self.fetched = None
        self._prefetch_ahead(side)
        return tensor

    def _prefetch_ahead(self, side: torch.cuda.Stream) -> None:
        """Start the copies back of what backward asks for next: the items this one links to (prev, then)
        and, PREFETCH_DEPTH levels down the prev chain, theirs (a copy already started is not redone)."""
        item = self
        for _ in range(PREFETCH_DEPTH):
            for link in (item.prev, *item.then):
                linked = link() if link is not None else None
                if linked is not None:
                    linked.prefetch(side)
            item = item.prev() if item.prev is not None else None
            if item is None:
                return


class _OffloadHooks:
    """Saved-tensor hooks with one side stream per device and a queue of copies in flight."""

    def __init__(self):
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.in_flight: list[_Offloaded] = []
        self.last: dict[torch.device, weakref.ref] = {}
        self.gate_up: weakref.ref | None = None  # the last kept gate/up product not yet linked (_pack_split_layer)
        self.in_forward = False  # packed since the last unpack: copy_pacing's forward boundaries

    def _reap(self) -> None:
        """Drop GPU references whose host copy has completed, without waiting for the others. (Until
        2026-12-03 completed items left the queue with their GPU reference still set: every layer input
        stayed on the GPU until backward, 1 GiB of an 8B step at 2 x 2,048 tokens.) Each layer the host
        runs ahead of the device keeps one more input here until its copy is done; backward's first
        restore reaps them all (unpack), before the layers' backward working sets, where the step peaks.
        The newest saved tensor stays on the GPU: the forward's last, which backward restores first, then
        needs no copy back (that copy could not be prefetched: a 0.4 ms stall at each step's first layer
        backward, H100 profile of 2026-12-07)."""
        pending = []
        newest = self.in_flight[-1] if self.in_flight else None
        for item in self.in_flight:
            if item.gpu is None:
                continue
            if item is newest:  # backward asks for it first: its GPU copy is kept until another is saved
                pending.append(item)
            elif REAP_DONE and item.done.query():
                item.gpu = None
            else:
                pending.append(item)
        self.in_flight = pending

    def pack(self, tensor: torch.Tensor, chained: bool = True):
        """chained=False: the item is not linked into the chain of prefetches (its restore prefetches
        nothing, and the next item's prev is not it); whoever packs it links it with `then`."""
        if not tensor.is_cuda or tensor.numel() * tensor.element_size() < _MIN_OFFLOAD_BYTES:
            return tensor
        side = self.streams.get(tensor.device)
        if side is None:  # (not setdefault: that would make, and drop, a new Stream at every call)
            side = self.streams[tensor.device] = torch.cuda.Stream(tensor.device)
        if not self.in_forward:
            self.in_forward = True
            copy_pacing.PACING.forward_begins(_KEPT_PRODUCTS)
        last = self.last.get(tensor.device) if chained else None
        item = _Offloaded(tensor, side, last() if last is not None else None, copy_pacing.PACING.timing)
        if chained:
            self.last[tensor.device] = weakref.ref(item)
        self._reap()
        self.in_flight.append(item)
        self._limit_in_flight()
        return item

    def _limit_in_flight(self, limit: int | None = None) -> None:
        """Where the host is far ahead of the GPU, drop the GPU tensors of the oldest copies until at most
        `limit` (MAX_IN_FLIGHT) are in flight, the compute stream waiting for each copy first (HOST_WAIT:
        the host)."""
        limit = MAX_IN_FLIGHT if limit is None else limit
        while len(self.in_flight) > limit:
            oldest = self.in_flight.pop(0)
            if oldest.gpu is not None:  # (None: already released, nothing to wait for)
                if HOST_WAIT:
                    oldest.done.synchronize()
                else:  # the tensor was made on the compute stream, so its block is reused there only
                    current_stream(oldest.device).wait_event(oldest.done)
                oldest.gpu = None

    def drain(self) -> None:
        """Wait for every copy in flight but the newest one's, and drop their GPU tensors."""
        self._limit_in_flight(1)

    def unpack(self, packed):
        if not isinstance(packed, _Offloaded):
            return packed
        if self.in_forward:
            self.in_forward = False
            copy_pacing.PACING.forward_ends()
        # The forward's last copies are done by now: their GPU tensors go before backward's working sets.
        if REAP_DONE:
            self._reap()
        else:
            self.drain()
        return packed.restore(self.streams[packed.device])


_HOOKS = _OffloadHooks()

# An input that requires grad, so that the layer's output does whenever autograd is on, whatever its
# real inputs (the first layer's input requires grad only with enable_input_require_grads).
_ANCHOR = torch.empty(0, requires_grad=True)

_USES_DROPOUT = weakref.WeakKeyDictionary()  # layer -> whether it holds a dropout with p > 0


def _layer_of(function):
    """The module a transformers checkpoint call runs: partial(<layer's super().__call__>, **kwargs) up to
    transformers 5.2x, partial(<the class's forward>, layer, **kwargs) in 5.24 and later (where this
    returned None, so every layer counted as drawing random numbers and had its RNG state replayed)."""
    owner = getattr(getattr(function, "func", function), "__self__", None)
    if owner is None:
        args = getattr(function, "args", None)
        if args and isinstance(args[0], torch.nn.Module):
            owner = args[0]
    return owner


_TRAINABLE = weakref.WeakKeyDictionary()  # layer -> weak references to its trainable parameters


def _trainable_parameters(layer: torch.nn.Module) -> list[torch.Tensor]:
    """The layer's parameters that required grad when first asked, listed once (layer.parameters() costs
    ~0.1 ms a call, once a layer a step in a backward bound by the host). A parameter added or made
    trainable later is missed: its cached copies are then kept until the next step, as before."""
    refs = _TRAINABLE.get(layer)
    if refs is None:
        refs = _TRAINABLE[layer] = [weakref.ref(p) for p in layer.parameters() if p.requires_grad]
    return [p for p in (ref() for ref in refs) if p is not None]


def _uses_dropout(layer: torch.nn.Module | None) -> bool:
    """Whether recomputing `layer` draws random numbers (then its random state is replayed). Unknown
    callables count as drawing. Decided once per layer: a dropout is set when the model is built."""
    if layer is None:
        return True
    known = _USES_DROPOUT.get(layer)
    if known is None:
        known = any((isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0)
                    or float(getattr(m, "attention_dropout", 0.0) or 0.0) > 0 for m in layer.modules())  # fmt: skip
        _USES_DROPOUT[layer] = known
    return known


def _requires_grad(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if isinstance(value, (tuple, list)):
        return any(isinstance(v, torch.Tensor) and v.requires_grad for v in value)
    return False


def _lean_path_applies(function, args) -> bool:
    """Whether `_CheckpointedLayer` can stand in for torch's checkpoint (see the module docstring)."""
    if not args or not isinstance(args[0], torch.Tensor) or not torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling():  # dynamo knows torch's checkpoint; a backward that calls backward it cannot trace
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return False
    keywords = getattr(function, "keywords", None) or {}
    return not any(_requires_grad(v) for v in keywords.values())


def _autocast_states() -> list[tuple]:
    return [(device, torch.get_autocast_dtype(device), torch.is_autocast_cache_enabled())
            for device in ("cuda", "cpu") if torch.is_autocast_enabled(device)]  # fmt: skip


class _CheckpointedLayer(torch.autograd.Function):
    """One checkpointed layer: forward without autograd keeping only its (offloaded) inputs; backward
    reruns it with autograd and backpropagates through the rerun. `run(*args)` is the layer call."""

    @staticmethod
    def forward(ctx, run, offload, replay_rng, _anchor, *args):
        device = args[0].device
        ctx.run, ctx.device, ctx.autocast = run, device, _autocast_states()
        ctx.rng = None
        if replay_rng:
            ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        ctx.saved = [_HOOKS.pack(a) if offload and isinstance(a, torch.Tensor) else a for a in args]
        # Inputs kept as they are (CPU, small, or offload off) are read again in backward: an in-place
        # change in between would make the recompute silently differ, so their versions are checked.
        ctx.versions = [(i, a._version) for i, a in enumerate(ctx.saved) if isinstance(a, torch.Tensor)]
        # In halves (layer_split.py) where the layer has a rule: h1 is offloaded after x, so that
        # backward's restore of h1 prefetches x.
        layer = _layer_of(run) if offload and not replay_rng else None
        ctx.split = layer_split.rule_of(layer)
        ctx.h1, ctx.kept = None, {}
        if ctx.split is not None:
            kinds = _KEPT_PRODUCTS.get(layer) if _tokens(args) <= KEPT_PRODUCTS_MAX_TOKENS else None
            kept = {} if kinds else None
            if kept is not None:
                from loraforge.models.backward_recompute import keeping_products  # (loraforge.models imports us)
            with contextlib.nullcontext() if kept is None else keeping_products(kept, kinds):
                output, h1 = layer_split.forward_capturing_h1(run, args, layer, ctx.split[0])
            if h1 is None:
                ctx.split = None
            else:
                _pack_split_layer(ctx, h1, kept)
        else:
            output = run(*args)
        tensors = (output,) if isinstance(output, torch.Tensor) else output
        if not isinstance(tensors, tuple) or not all(o is None or isinstance(o, torch.Tensor) for o in tensors):
            raise TypeError(f"a checkpointed layer must return a tensor or a tuple of tensors, got {type(output)}")
        return output

    @staticmethod
    def backward(ctx, *grads):
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError('use_gradient_checkpointing="unsloth" recomputes layers inside loss.backward(); '
                               "torch.autograd.grad(..., inputs=...) cannot reach them: call backward(), or use "
                               "use_gradient_checkpointing=True")  # fmt: skip
        for i, version in ctx.versions:
            if ctx.saved[i]._version != version:
                raise RuntimeError(f"input {i} of a checkpointed layer was modified in place after the layer ran; "
                                   "its recompute in backward would not match the forward")  # fmt: skip
        wants = ctx.needs_input_grad[4:]
        residual_grad = None
        if ctx.split is not None:  # phase 1: the MLP half, from h1 (layer_split.py)
            grads = (_mlp_half_backward(ctx, grads[0]),)
        inputs = []
        for item, want in zip(ctx.saved, wants):
            value = _HOOKS.unpack(item)
            if isinstance(value, torch.Tensor):
                value = value.detach().requires_grad_(want)
            inputs.append(value)
        ctx.saved = None
        with contextlib.ExitStack() as stack:
            _enter_forward_modes(stack, ctx)
            if ctx.rng is not None:
                cuda = ctx.device.type == "cuda"
                stack.enter_context(torch.random.fork_rng(devices=[ctx.device] if cuda else [], device_type="cuda"))
                torch.set_rng_state(ctx.rng[0])
                if cuda:
                    torch.cuda.set_rng_state(ctx.rng[1], ctx.device)
            # The rerun's outputs only feed the backward below: layers may skip what nothing reads.
            # (Imported here: loraforge.models imports this module.)
            from loraforge.models.backward_recompute import recomputing_for_backward, reusing_products

            if ctx.split is None:
                stack.enter_context(recomputing_for_backward())
                outputs = ctx.run(*inputs)
            elif grads[0] is None:  # no gradient reached h1: nothing to backpropagate
                outputs = (None,)
            else:  # phase 2: up to h1, whose value nothing reads (nor, by the rule, the attention output's)
                stack.enter_context(recomputing_for_backward(attention_output_unused=ctx.split[1]))
                # kept from the forward: the rerun takes them instead of recomputing them
                if ctx.kept:
                    stack.enter_context(reusing_products(_restored(ctx.kept)))
                    ctx.kept = {}
                if layer_split.branch_verified(_layer_of(ctx.run)):  # up to the attention branch: h1 = x + it
                    outputs, residual_grad = layer_split.attention_branch(ctx.run, inputs), grads[0]
                else:
                    outputs = layer_split.attention_half(ctx.run, inputs)
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
        pairs = [(o, g.to(o.dtype)) for o, g in zip(outputs, grads)
                 if o is not None and o.requires_grad and g is not None]  # fmt: skip
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        if residual_grad is not None and wants[0]:  # x's gradient through the residual (attention_branch)
            inputs[0].grad = _plus_residual(inputs[0].grad, residual_grad)
        layer = _layer_of(ctx.run)
        if layer is not None:  # its adapters' compute-dtype copies have served their last use this step
            from loraforge.models.stacked_lora import release_adapter_caches

            release_adapter_caches(_trainable_parameters(layer))
        ctx.run, ctx.kept = None, None
        grads_in = (t.grad if want and isinstance(t, torch.Tensor) else None for t, want in zip(inputs, wants))
        return (None, None, None, None, *grads_in)


def _pack_split_layer(ctx, h1: torch.Tensor, kept: dict | None) -> None:
    """Offload what a layer in halves keeps: h1, and the stacked products it keeps for its rerun
    (_KEPT_PRODUCTS). Those are out of the chain of prefetches; h1's restore, at the start of the layer's
    backward, prefetches after the layer's input x its own Q/K/V product (needed in phase 2, 50 MB of an
    8B layer at 2 x 2,048 tokens) and the gate/up product of the layer before (needed one layer later:
    235 MB, ~4.5 ms over PCIe)."""
    waiting, _HOOKS.gate_up = _HOOKS.gate_up, None
    for kind, (product, h) in (kept or {}).items():
        ctx.kept[kind] = (_HOOKS.pack(product, chained=False), h)
    links = []
    for kind in ("qkv", "attention"):  # needed in phase 2, which follows phase 1 at once
        kept_now = ctx.kept.get(kind)
        if kept_now is not None and isinstance(kept_now[0], _Offloaded):
            links.append(weakref.ref(kept_now[0]))
    gate_up = ctx.kept.get("gate_up")
    if waiting is not None:
        links.append(waiting)
    if gate_up is not None and isinstance(gate_up[0], _Offloaded):
        _HOOKS.gate_up = weakref.ref(gate_up[0])
    ctx.h1 = _HOOKS.pack(h1)
    if links and isinstance(ctx.h1, _Offloaded):
        ctx.h1.then = tuple(links)


def _enter_forward_modes(stack: contextlib.ExitStack, ctx) -> None:
    """For a rerun in backward: autograd on, and the autocast states the forward ran under."""
    stack.enter_context(torch.enable_grad())
    for device, dtype, cache in ctx.autocast:
        stack.enter_context(torch.autocast(device, dtype=dtype, cache_enabled=cache))


def _mlp_half_backward(ctx, grad_output: torch.Tensor | None) -> torch.Tensor | None:
    """Phase 1 of a layer in halves (layer_split.py): restore h1, rerun the MLP half from it and
    backpropagate the layer's output gradient; returns dL/dh1."""
    h1 = _HOOKS.unpack(ctx.h1).detach().requires_grad_(True)
    ctx.h1, gate_up = None, ctx.kept.pop("gate_up", None)
    if grad_output is None:
        return None
    from loraforge.models.backward_recompute import recomputing_for_backward, reusing_products

    with contextlib.ExitStack() as stack:
        _enter_forward_modes(stack, ctx)
        stack.enter_context(recomputing_for_backward())
        if gate_up is not None:  # kept from the forward: the rerun takes it instead of recomputing it
            stack.enter_context(reusing_products(_restored({"gate_up": gate_up})))
        branch = layer_split.mlp_branch(_layer_of(ctx.run), ctx.split[0], h1)
        # The layer's output is h1 + branch. The sum is never formed (its values would be read by nothing):
        # the branch is backpropagated and the residual's gradient added after; LORAFORGE_RESIDUAL_FREE_RERUN=0
        # forms and backpropagates it (for comparisons).
        output = branch if layer_split.RESIDUAL_FREE else h1 + branch
    torch.autograd.backward(output, grad_output.to(output.dtype))
    return _plus_residual(h1.grad, grad_output) if layer_split.RESIDUAL_FREE else h1.grad


def _restored(kept: dict) -> dict:
    """kind -> (product back on the GPU, H) from ctx.kept's kind -> (offloaded product, H)."""
    return {kind: (_HOOKS.unpack(product), h) for kind, (product, h) in kept.items()}


def _plus_residual(grad: torch.Tensor | None, residual_grad: torch.Tensor) -> torch.Tensor:
    """grad + residual_grad, into grad (a gradient autograd just formed for a leaf of a rerun)."""
    if grad is None:
        return residual_grad
    return grad.add_(residual_grad)


# The last KEEP_LAST_LAYERS decoder layers run without a checkpoint (LORAFORGE_KEEP_LAST_LAYERS, default 1)
# when a batch holds at most KEEP_LAST_MAX_TOKENS tokens: their backward follows the loss at once, so
# their saved activations live only across the loss, and their recompute (~1/L of the step's recompute,
# plus the offload round trips) is saved. They raise the memory at the loss by about one layer's
# activations, which grow with the tokens: hence the cap (long sequences checkpoint every layer).
# Measured on the 8B step at 2 x 2,048 tokens (H100, 2026-12-07): 343.6 -> 340.6 ms (56cd331) and
# 333.1 -> 328.8 ms (7a929da), peak +0.23-0.27 GiB (6.95 GiB against Unsloth's 7.03); the last two layers:
# 338.7 ms at 7.38 GiB.
KEEP_LAST_LAYERS = int(os.environ.get("LORAFORGE_KEEP_LAST_LAYERS", "1") or 0)
KEEP_LAST_MAX_TOKENS = 8192
_KEPT_LAYERS = weakref.WeakSet()  # the layers offloaded_checkpoint runs as they are

# Every GATE_UP_EVERY-th decoder layer in halves (from the first; not the last) also offloads its
# fused MLP's [G | U] product, and its MLP half's rerun takes it back instead of recomputing the gate/up
# matmul (4 n H I FLOPs: ~1.4 ms of an 8B layer at 2 x 2,048 tokens on an H100) and dequantizing its
# bases; every QKV_EVERY-th likewise its Q/K/V product (2 n H (H + 2 H_kv) FLOPs, ~0.3 ms there). The
# price is PCIe time, 2 bytes an entry each way (235 MB and 50 MB there), which the forward's copies to
# host must hide behind the forward's own compute (LORAFORGE_OFFLOAD_GATE_UP_EVERY and
# LORAFORGE_OFFLOAD_QKV_EVERY; 0: none). Measured on the 8B step (H100, 2026-12-07, 515bb00, against
# 344.1 ms and 6.65 GiB): Q/K/V every layer 334.0 ms, +0.07 GiB (the default); gate/up every 2nd, 3rd, 4th
# layer 353.5, 343.2, 340.0 ms, +0.19 GiB: each 235 MB copy takes ~4.7 ms of PCIe, longer than a layer's
# forward, so the copies queue up and stall the forward (off by default).
# Only for batches of at most KEPT_PRODUCTS_MAX_TOKENS tokens: the products live in pinned host memory
# beside the layer inputs (Q/K/V's adds 75% to them: 6.4 GB at 16k tokens of the 8B model), and long
# sequences, where host memory runs short first, keep the plain recompute.
GATE_UP_EVERY = int(os.environ.get("LORAFORGE_OFFLOAD_GATE_UP_EVERY", "0") or 0)
QKV_EVERY = int(os.environ.get("LORAFORGE_OFFLOAD_QKV_EVERY", "1") or 0)
# Every ATTENTION_EVERY-th such layer likewise keeps its attention's output O and log-sum-exp, so that its
# rerun skips the attention forward (models/kept_attention.py: ~0.16 ms of an 8B layer at 2 x 2,048
# tokens on an H100, for O's 33.5 MB each way over PCIe). LORAFORGE_OFFLOAD_ATTENTION_EVERY (0: none).
# Measured on the 8B step (H100, 2026-12-07, ff19871, each in its own process): 326.3 -> 324.8 ms,
# +0.01 GiB.
ATTENTION_EVERY = int(os.environ.get("LORAFORGE_OFFLOAD_ATTENTION_EVERY", "1") or 0)
# Where the forward's copies to host cannot keep up (a host with slower PCIe or memory), copy_pacing.py gives
# the kept products up, kind by kind, after measuring the copies of a forward.
KEPT_PRODUCTS_MAX_TOKENS = 16384
_KEPT_PRODUCTS = weakref.WeakKeyDictionary()  # layer -> the kinds of products it keeps ("gate_up", "qkv", "attention")


def _tokens(args) -> int:
    """The tokens a layer call holds: its hidden states' leading dimensions (0 when it has none)."""
    hidden = args[0] if args and isinstance(args[0], torch.Tensor) else None
    return hidden.shape[:-1].numel() if hidden is not None and hidden.dim() >= 2 else 0


def _keeps_whole(layer, tokens: int) -> bool:
    """Whether this call of a layer runs without a checkpoint: one of the last KEEP_LAST_LAYERS, or an extra
    one that the embedding table's freed memory pays for (kept_layer_budget), at most KEEP_LAST_MAX_TOKENS."""
    if not 0 < tokens <= KEEP_LAST_MAX_TOKENS:
        return False
    return layer in _KEPT_LAYERS or kept_layer_budget.keeps_extra(layer, tokens)


def offloaded_checkpoint(function, *args, **kwargs):
    """A drop-in for transformers' `_gradient_checkpointing_func`."""
    layer = _layer_of(function)
    if _KEPT_LAYERS:
        tokens = _tokens(args)
        if _keeps_whole(layer, tokens):
            if DRAIN_BEFORE_KEPT and _HOOKS.in_flight:
                _HOOKS.drain()
            return kept_layer_budget.run_kept(layer, tokens, function, args, kwargs)
    if _lean_path_applies(function, args):
        return _CheckpointedLayer.apply(function, True, _uses_dropout(layer), _ANCHOR, *args)
    kwargs.setdefault("use_reentrant", False)
    on_gpu = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    hooks = torch.autograd.graph.saved_tensors_hooks(_HOOKS.pack, _HOOKS.unpack) if on_gpu else contextlib.nullcontext()
    with hooks:
        return checkpoint(function, *args, **kwargs)


def enable_gradient_checkpointing(model: torch.nn.Module, mode) -> None:
    """mode: True (ordinary, in-GPU checkpointing), "unsloth" (offloaded), False/None (off)."""
    if not mode:
        return
    if mode not in (True, "unsloth"):
        raise ValueError(f'use_gradient_checkpointing must be True, False or "unsloth", got {mode!r}')
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if mode == "unsloth":
        for module in model.modules():
            if hasattr(module, "_gradient_checkpointing_func"):
                module._gradient_checkpointing_func = offloaded_checkpoint
        # (imported here, not at the top: loraforge.models imports this module)
        from loraforge.models.architectures import decoder_layers

        layers = decoder_layers(model)
        if KEEP_LAST_LAYERS > 0:
            _KEPT_LAYERS.update(layers[-KEEP_LAST_LAYERS:])
            kept_layer_budget.register(model, layers, KEEP_LAST_LAYERS)
        for kind, every in (("gate_up", GATE_UP_EVERY), ("qkv", QKV_EVERY), ("attention", ATTENTION_EVERY)):
            for layer in layers[: len(layers) - 1 : every] if every > 0 else ():
                _KEPT_PRODUCTS[layer] = _KEPT_PRODUCTS.get(layer, frozenset()) | {kind}
        copy_pacing.reset()  # this model's products are measured afresh (copy_pacing.py)


def uses_offloaded_checkpointing(model: torch.nn.Module) -> bool:
    """Whether some layer of `model` checkpoints with loraforge's offloaded function."""
    return any(getattr(m, "_gradient_checkpointing_func", None) is offloaded_checkpoint for m in model.modules())


def restore_offloaded_checkpointing(model: torch.nn.Module) -> None:
    """Put use_gradient_checkpointing="unsloth"'s function back on every checkpointed layer.

    transformers' Trainer calls gradient_checkpointing_enable() when training starts (GRPOConfig turns
    gradient_checkpointing on by default) and TRL turns checkpointing off and on around every rollout's
    scoring; each call installs plain torch checkpointing, which keeps the saved layer inputs on the GPU.
    """
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is not None and func is not offloaded_checkpoint and getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = offloaded_checkpoint
