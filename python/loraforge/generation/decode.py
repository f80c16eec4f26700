"""The decode loop: prefill into a static KV cache, then one token per step, on CUDA as a CUDA graph.

Generation of a QLoRA model is bound by the host: a decode step of an 8B model is hundreds of small
launches (transformers' layers, PEFT's LoRA layers, the NF4 dequantizations) whose Python and launch
time is an order of magnitude above the GPU's work. So one decode step is captured once in a
torch.cuda.CUDAGraph and replayed per token; the host then only replays and, every `check_every`
tokens, reads whether every row has finished.

A step has static shapes and reads nothing on the host. Its inputs and outputs are tensors that live as
long as the session (`DecodeBuffers`), updated in place by the step itself:

    tokens [B, 1]        the token fed this step (the one chosen last step)
    position_ids [B, 1]  its position: prompt positions are cumsum(mask) - 1, then +1 per step (transformers')
    slot [1]             its slot in the cache (the prompt's padded length, then +1 per step)
    key_valid [B, L]     which cache slots hold a real token (left padding never does)
    unfinished [B]       rows that have not emitted EOS; finished rows emit the pad token
    out [B, L], out_index [1]   the chosen tokens, and how many there are

The cache is transformers' StaticCache of L slots (prompt + new tokens, rounded up to 64), whose layers
keep their fill level on the device (`cumulative_length`) and write with index_copy_. The attention
mask of a step is built here, [B, 1, 1, L] (key slot valid and <= slot), as a boolean mask for SDPA and an
additive one in the model's dtype for eager attention, and handed to the model as a prepared 4D mask,
which transformers' mask functions pass through: their own construction reads values on the host in
places (an all-ones check, scalar tensors made from Python numbers). For sliding-window layers the same
mask is right only while the window covers the whole cache, which the caller checks (`cache_fits`).
The prefill is an ordinary forward with the prompt's 2D mask, as in `model.generate`.

Capture: the first steps run eagerly on a side stream (they are real steps: caches of adapter casts,
dequantization arguments and Triton kernels fill there), then one step is captured. Recorded kernels read
the tensors they were captured with, so a graph is replayed only while the model is what it was then
(`model_state_key`: every parameter's storage and version counter, the optimizer-step count, adapters
active/disabled/merged, training mode) and for the same batch, cache length, dtype and settings.
A capture that fails (an operation a captured stream does not allow) leaves a warning and the rest of
the run eager: slower, never different.
"""

from __future__ import annotations

import inspect
import warnings
import weakref

import torch

from loraforge.generation.sampling import choose_tokens
from loraforge.generation.settings import DecodeSettings
from loraforge.models.weight_streaming import streamer_of

CACHE_ROUNDING = 64  # cache slots are a multiple of this, so calls with nearby prompt lengths share a graph
WARMUP_STEPS = 2  # eager steps on a side stream before capture
MIN_STEPS_FOR_GRAPH = 8  # fewer decode steps than this run eagerly (capture costs about three steps)

# Counters for tests and benchmarks: captures, replays, eager steps.
STATS = {"captures": 0, "replays": 0, "eager_steps": 0, "capture_failures": 0}

_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # causal LM -> DecodeSession kept for reuse


def forward_arguments(causal_lm: torch.nn.Module) -> tuple[str, bool]:
    """(the forward's name for the cache, whether it takes logits_to_keep): transformers 5.24 calls the cache
    `cache` (with `past_key_values` deprecated), 5.17 `past_key_values`."""
    parameters = inspect.signature(type(causal_lm).forward).parameters
    return ("cache" if "cache" in parameters else "past_key_values"), "logits_to_keep" in parameters


def cache_length(prompt_length: int, max_new_tokens: int, config) -> int:
    """Slots of the static cache: rounded up to CACHE_ROUNDING, but not past a sliding window that the
    exact length still fits in."""
    needed = prompt_length + max_new_tokens
    rounded = -(-needed // CACHE_ROUNDING) * CACHE_ROUNDING
    window = getattr(config.get_text_config(decoder=True), "sliding_window", None)
    if isinstance(window, int) and needed <= window < rounded:
        return window
    return rounded


def cache_fits(cache, length: int) -> str | None:
    """None when every layer of the StaticCache is a plain static layer of `length` slots (sliding layers
    whose window covers the whole cache are), else why not."""
    from transformers.cache_utils import StaticLayer

    for index, layer in enumerate(cache.layers):
        if not isinstance(layer, StaticLayer):
            return f"cache layer {index} is a {type(layer).__name__}, not a static KV layer"
        if layer.max_cache_len != length:
            return (f"layer {index} has a sliding window of {layer.max_cache_len} tokens, shorter than prompt + new "
                    f"tokens ({length})")  # fmt: skip
    return None


def model_state_key(causal_lm: torch.nn.Module) -> tuple:
    """What a captured step depends on beyond its inputs: the tensors it reads (by storage and version),
    the adapters' switches (they change which code runs), the optimizer-step count (cached adapter casts
    are rebuilt after a step), training mode and autocast."""
    from loraforge.models.lora_autograd import optimizer_steps

    params = tuple((p.data_ptr(), p._version) for p in causal_lm.parameters())
    buffers = tuple(b.data_ptr() for b in causal_lm.buffers())
    adapters = tuple((bool(getattr(m, "disable_adapters", False)), tuple(getattr(m, "active_adapters", ()) or ()),
                      bool(getattr(m, "merged", False)))
                     for m in causal_lm.modules() if hasattr(m, "lora_A"))  # fmt: skip
    device = causal_lm.device.type if hasattr(causal_lm, "device") else "cuda"
    autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device) if device != "meta" else None)
    return params, buffers, adapters, optimizer_steps(), causal_lm.training, autocast


def cached_tensors(causal_lm: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors our forwards keep in caches outside the model (adapter casts, stacked adapters) for this
    model's parameters. A captured step reads them by address; the session holds them so that a cache
    entry replaced meanwhile (say, by a forward in another dtype) is not freed under the graph. Their
    values cannot go stale without `model_state_key` changing."""
    from loraforge.models.lora_autograd import ADAPTER_CASTS
    from loraforge.models.stacked_lora import _STACKED_ADAPTERS

    held = []
    for param in causal_lm.parameters():
        for cache in (ADAPTER_CASTS, _STACKED_ADAPTERS):
            entry = cache.get(param)
            if entry is not None:
                held.extend(t for t in entry[1:] if isinstance(t, torch.Tensor))
    return held


class DecodeBuffers:
    """The static tensors a decode step reads and writes (see the module docstring)."""

    def __init__(self, batch: int, length: int, device: torch.device, settings: DecodeSettings):
        def zeros(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=device)

        self.tokens, self.position_ids, self.slot = zeros(batch, 1), zeros(batch, 1), zeros(1)
        self.key_valid, self.key_slots = zeros(batch, length, dtype=torch.bool), torch.arange(length, device=device)
        self.unfinished, self.out, self.out_index = zeros(batch, dtype=torch.bool), zeros(batch, length), zeros(1)
        eos = settings.eos_token_ids
        self.eos = torch.tensor(eos, dtype=torch.long, device=device) if eos else None


class DecodeSession:
    """One static cache, its buffers and (on CUDA) the captured decode step, for one batch size, cache
    length and settings. `start` prefills a new prompt batch; `advance` runs decode steps."""

    def __init__(self, causal_lm, cache, batch: int, length: int, settings: DecodeSettings, mask_dtype):
        self.cache, self.length, self.settings = cache, length, settings
        self.batch = batch
        self.mask_dtype = mask_dtype  # None: a boolean mask (SDPA); else additive in this dtype (eager)
        self.device = causal_lm.get_input_embeddings().weight.device
        self.buffers = DecodeBuffers(batch, length, self.device, settings)
        self.cache_argument, self.takes_logits_to_keep = forward_arguments(causal_lm)
        self.capture_failed = False
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None
        self.held: list[torch.Tensor] = []  # see cached_tensors
        self.model = weakref.ref(causal_lm)  # the graph does not need the model; the session must not keep it
        streamer = streamer_of(causal_lm)  # base weights streamed from host memory: replays copy behind its back
        self.streamer = weakref.ref(streamer) if streamer is not None else None

    # -- one forward and the token choice ------------------------------------------------------------

    def _forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        extra = {"logits_to_keep": 1} if self.takes_logits_to_keep else {}
        output = self.model()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=True, **{self.cache_argument: self.cache}, **extra)  # fmt: skip
        return output.logits[:, -1, :].float()

    def _emit(self, logits: torch.Tensor) -> None:
        """Choose this step's tokens, pad finished rows, record them, and feed them to the next step."""
        b, s = self.buffers, self.settings
        if b.eos is not None and s.eos_blocked_steps > 0:  # min_new_tokens / min_length
            blocked = b.out_index < s.eos_blocked_steps
            logits = logits.index_copy(1, b.eos, logits.index_select(1, b.eos).masked_fill(blocked, float("-inf")))
        chosen = choose_tokens(logits, s)
        if b.eos is not None:
            chosen = torch.where(b.unfinished, chosen, s.pad_token_id)
            b.unfinished.logical_and_((chosen[:, None] != b.eos).all(dim=-1))
        b.out.index_copy_(1, b.out_index, chosen[:, None])
        b.out_index.add_(1)
        b.tokens.copy_(chosen[:, None])

    def _step(self) -> None:
        """One decode step: the graph's body."""
        b = self.buffers
        b.key_valid.index_fill_(1, b.slot, True)
        allowed = b.key_valid[:, None, None, :] & (b.key_slots <= b.slot)
        if self.mask_dtype is None:
            mask = allowed
        else:
            mask = torch.zeros(allowed.shape, dtype=self.mask_dtype, device=self.device)
            mask.masked_fill_(~allowed, torch.finfo(self.mask_dtype).min)
        self._emit(self._forward(b.tokens, mask, b.position_ids))
        b.slot.add_(1)
        b.position_ids.add_(1)

    # -- a run ---------------------------------------------------------------------------------------

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Reset the cache and buffers, prefill the prompts, choose the first token."""
        b = self.buffers
        self.cache.reset()
        prompt = input_ids.shape[1]
        b.key_valid.zero_()
        b.key_valid[:, :prompt] = attention_mask.bool()
        b.unfinished.fill_(True)
        b.out.fill_(self.settings.pad_token_id)
        b.out_index.zero_()
        # Positions as model.generate makes them: cumulative count of real tokens, 0 on padding.
        positions = attention_mask.long().cumsum(-1) - 1
        positions.masked_fill_(attention_mask == 0, 0)
        self._emit(self._forward(input_ids, attention_mask, positions))
        b.position_ids.copy_(positions[:, -1:] + 1)
        b.slot.fill_(prompt)

    def advance(self, steps: int, capture: bool) -> None:
        """Run `steps` decode steps: replays of the captured step (captured first when `capture` and there
        is none yet), else eager steps."""
        done = 0
        if capture and self.graph is None and not self.capture_failed and steps > WARMUP_STEPS:
            done = self._warm_up_and_capture()
        streamer = self.streamer() if self.streamer is not None else None
        if streamer is not None and self.graph is not None:
            streamer.join_copies()  # no copy of an eager pass still in flight into a slot the replays fill
        for _ in range(steps - done):
            if self.graph is not None:
                self.graph.replay()
                STATS["replays"] += 1
            else:
                self._step()
                STATS["eager_steps"] += 1
        if streamer is not None and self.graph is not None:
            streamer.forget_slots()  # the capture recorded copies that did not run; the replays ran them

    def _warm_up_and_capture(self) -> int:
        """WARMUP_STEPS real steps on a side stream, then one step captured (not run). Returns the steps run."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._step()
                STATS["eager_steps"] += 1
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._step()
        except RuntimeError as error:
            # Nothing ran during the capture attempt; the remaining steps run eagerly.
            STATS["capture_failures"] += 1
            self.capture_failed = True
            torch.cuda.synchronize(self.device)
            warnings.warn(f"fast_generate: the decode step could not be captured in a CUDA graph ({error}); "
                          "decoding eagerly", stacklevel=4)  # fmt: skip
            return WARMUP_STEPS
        self.graph = graph
        self.held = cached_tensors(self.model())
        STATS["captures"] += 1
        return WARMUP_STEPS

    def all_finished(self) -> bool:
        return self.buffers.eos is not None and not bool(self.buffers.unfinished.any())

    def result(self, produced: int) -> torch.Tensor:
        """The new tokens [B, n]: cut where every row has emitted EOS, as model.generate stops."""
        out = self.buffers.out[:, :produced]
        if self.buffers.eos is not None:
            is_eos = (out[..., None] == self.buffers.eos).any(-1)
            ended = is_eos.any(dim=1)
            if bool(ended.all()):
                return out[:, : int(is_eos.int().argmax(dim=1).max()) + 1]
        return out


def session_for(causal_lm, batch: int, length: int, settings: DecodeSettings, mask_dtype,
                reuse: bool) -> tuple[DecodeSession | None, str | None]:  # fmt: skip
    """A session for this call: the kept one when its key matches, else a new one (None and the reason
    when the model's StaticCache is not one the loop supports)."""
    from transformers import StaticCache

    device = causal_lm.get_input_embeddings().weight.device
    key = (batch, length, settings.graph_key(), mask_dtype, device, model_state_key(causal_lm))
    kept = _SESSIONS.pop(causal_lm, None)
    if kept is not None and kept.key == key:
        session = kept
    else:
        del kept  # frees its cache and graph before a new one is allocated
        cache = StaticCache(config=causal_lm.config, max_cache_len=length)
        reason = cache_fits(cache, length)
        if reason is not None:
            return None, reason
        session = DecodeSession(causal_lm, cache, batch, length, settings, mask_dtype)
        session.key = key
    if reuse:
        _SESSIONS[causal_lm] = session
    return session, None


def release(causal_lm: torch.nn.Module) -> None:
    """Drop the kept session (cache, buffers, graph) of a model."""
    _SESSIONS.pop(causal_lm, None)
