"""The patched self-attention (fused Q/K/V, loraforge::rope) against plain transformers + PEFT."""

import dataclasses
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from loraforge import testing
from loraforge.models import FastLanguageModel
from loraforge.models import attention as lf_attention
from loraforge.models import patch as lf_patch

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

LAYERS = 2  # testing.tiny_config's num_layers
# Gemma 2's logit soft-capping has no SDPA form: transformers raises there, patched or not.
IMPLEMENTATIONS = [(arch, attn) for arch in testing.ARCHITECTURES for attn in ("eager", "sdpa")
                   if (arch, attn) != ("gemma2", "sdpa")]  # fmt: skip


class CountLoraforgeOps(TorchDispatchMode):
    """How often each loraforge op ran (as dispatched, so whatever Python called it)."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("loraforge."):
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _graph_nodes(tensor) -> list[str]:
    """Class names of every autograd node behind tensor, each node once."""
    seen, stack, names = set(), [tensor.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def _load(path, load_in_4bit=False, attn="eager", seed=0, **peft_kwargs):
    model, tokenizer = FastLanguageModel.from_pretrained(path, load_in_4bit=load_in_4bit, dtype=torch.float32,
                                                         attn_implementation=attn)  # fmt: skip
    peft_kwargs = {"r": 4, "lora_alpha": 8, "random_state": seed, "init_lora_weights": False, **peft_kwargs}
    return FastLanguageModel.get_peft_model(model, **peft_kwargs), tokenizer


def _pair(path, load_in_4bit=False, attn="eager", seed=0, **peft_kwargs):
    """The same weights and adapters twice: patched (ours) and unpatched (plain transformers + PEFT)."""
    ours, tokenizer = _load(path, load_in_4bit, attn, seed, **peft_kwargs)
    plain, _ = _load(path, load_in_4bit, attn, seed, **peft_kwargs)
    lf_patch.unpatch_model(plain)
    return ours, plain, tokenizer


def _attention_modules(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Attention")]


def _loss_and_grads(model, batch, **kwargs):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**batch, **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_grads(grads, expected):
    assert grads.keys() == expected.keys() and grads and all("lora_" in name for name in grads)
    for name in grads:
        # atol on the gradient's own scale: the stacked Q/K/V and gate/up products of NF4 layers sum in
        # another order than PEFT's three products, which moves fp32 results by ~1e-6 of that scale
        # after two layers (measured: up to 5e-6 relative to max |g|); a wrong formula is off by O(1).
        atol = max(1e-6, 2e-5 * expected[name].abs().max().item())
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=atol, msg=name)


@pytest.mark.parametrize("arch,attn", IMPLEMENTATIONS)
@pytest.mark.parametrize("load_in_4bit", (True, False))
def test_loss_and_lora_gradients_match_peft_through_the_fused_attention(saved_models, arch, attn, load_in_4bit, seed):
    ours, plain, tokenizer = _pair(saved_models[arch], load_in_4bit, attn, seed % 1000)
    assert all("forward" in m.__dict__ for m in _attention_modules(ours))
    batch = tokenizer(["The cat sat on the warm mat.", "Rain falls"], return_tensors="pt", padding=True)
    with CountLoraforgeOps() as ops:
        loss, grads = _loss_and_grads(ours, {**batch, "labels": batch["input_ids"]})
    loss_plain, grads_plain = _loss_and_grads(plain, {**batch, "labels": batch["input_ids"]})
    torch.testing.assert_close(loss, loss_plain, rtol=1e-5, atol=1e-6)
    _assert_same_grads(grads, grads_plain)
    # The new path ran in every layer: q/k/v as one autograd node, RoPE through our op (forward and
    # backward; gradient checkpointing replays the forward, hence "at least"). The graph is walked in
    # eval mode, without checkpointing: a checkpointed layer is one node whose inside is built only in
    # backward.
    ours.eval()
    nodes = _graph_nodes(ours(**batch, labels=batch["input_ids"], use_cache=False).loss)
    assert nodes.count("LoRAQKVFunctionBackward") == LAYERS
    assert ops.calls.get("loraforge.rope", 0) >= LAYERS and ops.calls.get("loraforge.rope_backward") == LAYERS


class RecordBackend:
    """Stands in for an attention backend (ALL_ATTENTION_FUNCTIONS[name]): records what it is handed."""

    def __init__(self, name, model):
        module = _attention_modules(model)[0]
        self.name = name
        self.inner = ALL_ATTENTION_FUNCTIONS.get(name) or sys.modules[type(module).__module__].eager_attention_forward
        self.calls = []

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        tensors = [t.detach().clone() for t in (query, key, value)]
        self.calls.append((type(module).__name__, module.layer_idx, tensors, attention_mask, kwargs))
        return self.inner(module, query, key, value, attention_mask, **kwargs)

    def __enter__(self):
        ALL_ATTENTION_FUNCTIONS[self.name] = self  # the instance-local override; del restores the global one
        return self

    def __exit__(self, *exc):
        del ALL_ATTENTION_FUNCTIONS[self.name]


@pytest.mark.parametrize("arch,attn", IMPLEMENTATIONS)
def test_backend_receives_what_the_stock_forward_hands_it(saved_models, arch, attn):
    """q, k, v (after RoPE), the mask and every keyword (scaling, dropout, sliding_window, softcap,
    position_ids, ...) reach the attention backend exactly as transformers' own forward passes them."""
    ours, plain, tokenizer = _pair(saved_models[arch], attn=attn)
    batch = tokenizer(["A red fox ran past the old barn.", "Hi"], return_tensors="pt", padding=True)
    records = []
    for model in (ours, plain):
        model.train()
        with RecordBackend(attn, model) as backend:
            model(**batch, labels=batch["input_ids"])
        records.append(backend.calls)
    assert len(records[0]) == len(records[1]) == LAYERS
    for (name, layer, tensors, mask, kwargs), (name_p, layer_p, tensors_p, mask_p, kwargs_p) in zip(*records):
        assert (name, layer) == (name_p, layer_p)
        for t, t_p in zip(tensors, tensors_p):
            torch.testing.assert_close(t, t_p, rtol=1e-5, atol=1e-6)
        assert (mask is None) == (mask_p is None) and (mask is None or torch.equal(mask, mask_p))
        assert kwargs.keys() == kwargs_p.keys()
        for k in kwargs:
            assert type(kwargs[k]) is type(kwargs_p[k]), k
            same = torch.equal(kwargs[k], kwargs_p[k]) if torch.is_tensor(kwargs[k]) else kwargs[k] == kwargs_p[k]
            assert same, k
    if arch in ("mistral", "gemma2"):  # the families with a sliding window in the tiny configs
        assert any(kwargs.get("sliding_window") for *_, kwargs in records[0])
    if arch == "gemma2":
        assert all(kwargs["softcap"] == 50.0 for *_, kwargs in records[0])


@pytest.mark.parametrize("arch", testing.ARCHITECTURES)
def test_generation_matches_unpatched(saved_models, arch):
    """With a KV cache the stock forward runs (documented choice); without one (use_cache=False: every
    step recomputes the whole prefix) the fused path runs, in place under no_grad. Same tokens."""
    ours, plain, tokenizer = _pair(saved_models[arch])
    batch = tokenizer(["Once upon a time", "The"], return_tensors="pt", padding=True, padding_side="left")
    tokens = {}
    for use_cache in (True, False):
        for name, model in (("ours", ours), ("plain", plain)):
            FastLanguageModel.for_inference(model)
            with torch.no_grad(), CountLoraforgeOps() as ops:
                tokens[name, use_cache] = model.generate(**batch, max_new_tokens=8, do_sample=False,
                                                         use_cache=use_cache, min_new_tokens=8)  # fmt: skip
            if name == "ours":
                in_place = ops.calls.get("loraforge.rope_", 0)
                assert in_place == (0 if use_cache else 8 * LAYERS) and "loraforge.rope" not in ops.calls
        assert torch.equal(tokens["ours", use_cache], tokens["plain", use_cache]), use_cache
    assert torch.equal(tokens["ours", True], tokens["ours", False])


def test_unpatch_restores_the_stock_attention(saved_models):
    ours, plain, tokenizer = _pair(saved_models["qwen3"])
    attention = _attention_modules(ours)
    assert attention and all(m.forward.__func__ is not type(m).forward for m in attention)
    lf_patch.unpatch_model(ours)
    assert not lf_patch.is_patched(ours)
    assert all("forward" not in m.__dict__ and m.forward.__func__ is type(m).forward for m in attention)
    batch = tokenizer(["Clouds drift over the hills."], return_tensors="pt")
    with CountLoraforgeOps() as ops:
        loss, grads = _loss_and_grads(ours, {**batch, "labels": batch["input_ids"]})
    assert not ops.calls  # nothing of ours runs any more
    loss_plain, grads_plain = _loss_and_grads(plain, {**batch, "labels": batch["input_ids"]})
    assert torch.equal(loss, loss_plain) and all(torch.equal(grads[n], grads_plain[n]) for n in grads)
    lf_patch.patch_model(ours)  # and back again
    assert all("forward" in m.__dict__ for m in attention)


def test_projections_the_fused_path_cannot_take_fall_back_to_the_stock_attention(saved_models, seed):
    """lora_dropout > 0: PEFT's dropout must run, so the whole attention takes the stock forward."""
    ours, plain, tokenizer = _pair(saved_models["llama"], seed=seed % 1000, lora_dropout=0.1)
    batch = tokenizer(["Salt and pepper."], return_tensors="pt")
    for model in (ours, plain):
        model.eval()
    with torch.no_grad(), CountLoraforgeOps() as ops:
        logits = ours(**batch, use_cache=False).logits
    assert "loraforge.rope" not in ops.calls and "loraforge.rope_" not in ops.calls
    with torch.no_grad():
        torch.testing.assert_close(logits, plain(**batch, use_cache=False).logits, rtol=1e-5, atol=1e-5)


def test_rope_support_rule():
    q, k = torch.zeros(2, 4, 5, 16), torch.zeros(2, 2, 5, 16)
    cos = torch.zeros(1, 5, 16)
    assert lf_attention.rope_supports(q, k, cos, cos)
    assert lf_attention.rope_supports(q, k, torch.zeros(2, 5, 8), torch.zeros(2, 5, 8))  # per-row, partial
    assert not lf_attention.rope_supports(q, k, torch.zeros(3, 5, 16), torch.zeros(3, 5, 16))  # batch mismatch
    assert not lf_attention.rope_supports(q, k, torch.zeros(1, 5, 18), torch.zeros(1, 5, 18))  # > head_dim
    assert not lf_attention.rope_supports(q, k, torch.zeros(1, 5, 7), torch.zeros(1, 5, 7))  # odd
    assert not lf_attention.rope_supports(q, k, torch.zeros(5, 16), torch.zeros(5, 16))  # 2-D
    assert not lf_attention.rope_supports(q, k.double(), cos, cos)


def test_an_attention_class_we_do_not_recognise_keeps_its_forward(saved_models, monkeypatch):
    class OddAttention(torch.nn.Module):  # defined here, where no eager_attention_forward lives
        def forward(self, hidden_states, attention_mask=None):
            return hidden_states

    assert lf_attention.module_functions(OddAttention()) is None
    # A rule the module does not fit (as after a transformers release renames an attribute): a warning,
    # the stock attention, every other fused forward still installed, the same loss as plain PEFT.
    odd_rule = dataclasses.replace(lf_patch.RULES["llama"].attention, qk_norm=True)  # LlamaAttention has no q_norm
    monkeypatch.setitem(lf_patch.RULES, "llama", dataclasses.replace(lf_patch.RULES["llama"], attention=odd_rule))
    with pytest.warns(UserWarning, match="LlamaAttention does not match"):
        ours, plain, tokenizer = _pair(saved_models["llama"])
    assert not any("forward" in m.__dict__ for m in _attention_modules(ours)) and lf_patch.is_patched(ours)
    batch = tokenizer(["Snow on the pines."], return_tensors="pt")
    loss, _ = _loss_and_grads(ours, {**batch, "labels": batch["input_ids"]})
    torch.testing.assert_close(loss, _loss_and_grads(plain, {**batch, "labels": batch["input_ids"]})[0])


# ---------------------------------------------------------------------------------------------
# Padding-free packed batches: several sequences in one row, position_ids restarting at 0 for each
# and no attention mask (TRL's padding_free collator). transformers (5.17 and 5.24) builds a
# block-diagonal causal mask from such position_ids for every mask-based backend (eager, sdpa, flex)
# when no attention_mask and no KV cache are passed; flash-attention reads position_ids itself
# (varlen). Our attention passes mask and position_ids through, so packing works wherever it works in
# transformers. It needs use_cache=False outside training: with a cache, transformers ignores the
# packing (our fused-loss training forward sets use_cache=False itself).

TEXTS = ["The cat sat on the warm mat.", "Rain falls softly", "Blue whales sing to each other at night."]


def _packed(tokenizer):
    seqs = [tokenizer(t, return_tensors="pt")["input_ids"][0] for t in TEXTS]
    input_ids = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    labels = input_ids.masked_fill(position_ids == 0, -100)  # as TRL's collator: no label across sequences
    return seqs, {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


@pytest.mark.parametrize("arch,attn", [(arch, "eager") for arch in testing.ARCHITECTURES]
                         + [("llama", "sdpa"), ("mistral", "sdpa")])  # fmt: skip
def test_packed_batch_equals_sequences_run_separately(saved_models, arch, attn, seed):
    ours, plain, tokenizer = _pair(saved_models[arch], attn=attn, seed=seed % 1000)
    seqs, packed = _packed(tokenizer)
    bounds = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0).tolist()

    ours.eval()
    with torch.no_grad():
        logits = ours(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        for seq, start, end in zip(seqs, bounds, bounds[1:]):
            alone = ours(input_ids=seq[None], use_cache=False).logits
            torch.testing.assert_close(logits[:, start:end], alone, rtol=1e-5, atol=1e-5)
        # The check has teeth: an all-ones mask (no packing) lets later sequences see earlier ones.
        unpacked = ours(**{k: packed[k] for k in ("input_ids", "position_ids")},
                        attention_mask=torch.ones_like(packed["input_ids"]), use_cache=False).logits  # fmt: skip
        assert not torch.allclose(unpacked[:, bounds[1] :], logits[:, bounds[1] :], atol=1e-3)

    # Training: one sum-reduced loss over the packed row (num_items_in_batch: every predicted token)
    # equals the sum of the sequences' losses, and so do the LoRA gradients.
    items = torch.tensor(sum(len(s) - 1 for s in seqs))
    with CountLoraforgeOps() as ops:
        loss, grads = _loss_and_grads(ours, packed, num_items_in_batch=items)
    assert ops.calls.get("loraforge.rope", 0) >= LAYERS
    losses, summed = [], {}
    for seq in seqs:
        loss_one, grads_one = _loss_and_grads(ours, {"input_ids": seq[None], "labels": seq[None]},
                                              num_items_in_batch=items)  # fmt: skip
        losses.append(loss_one)
        summed = {n: summed.get(n, 0) + g for n, g in grads_one.items()}
    torch.testing.assert_close(loss, sum(losses), rtol=1e-5, atol=1e-6)
    _assert_same_grads(grads, summed)
    # and the same as plain transformers + PEFT on the packed row
    loss_plain, grads_plain = _loss_and_grads(plain, packed, num_items_in_batch=items, use_cache=False)
    torch.testing.assert_close(loss, loss_plain, rtol=1e-5, atol=1e-6)
    _assert_same_grads(grads, grads_plain)
