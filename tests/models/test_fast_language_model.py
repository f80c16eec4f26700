"""FastLanguageModel with fused LoRA against plain transformers + PEFT on the same weights."""

import weakref

import pytest
import torch

from loraforge import testing
from loraforge.models import FastLanguageModel
from loraforge.models import patch as lf_patch
from loraforge.models.architectures import RULES
from tests.models._same_gradients import assert_same_gradients

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")


def _pair(path, load_in_4bit, seed):
    """The same weights and adapters twice: one patched (ours), one unpatched (plain PEFT)."""
    models = []
    for _ in range(2):
        model, tokenizer = FastLanguageModel.from_pretrained(path, load_in_4bit=load_in_4bit, dtype=torch.float32)
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=seed, init_lora_weights=False,
                                                 use_gradient_checkpointing="unsloth")  # fmt: skip
        models.append(model)
    ours, plain = models
    lf_patch.unpatch_model(plain)
    assert lf_patch.is_patched(ours) and not lf_patch.is_patched(plain)
    return ours, plain, tokenizer


def _loss_and_grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads


@pytest.mark.parametrize("arch", testing.ARCHITECTURES)
@pytest.mark.parametrize("load_in_4bit", (True, False))
def test_loss_and_lora_gradients_match_peft(saved_models, arch, load_in_4bit, seed, monkeypatch):
    from loraforge.models import stacked_lora
    from loraforge.train import layer_split
    from loraforge.train import offloaded_checkpointing as oc

    ours, plain, tokenizer = _pair(saved_models[arch], load_in_4bit, seed % 1000)
    monkeypatch.setattr(oc, "_KEPT_LAYERS", weakref.WeakSet())  # every layer checkpointed, as counted below
    norms = [m for m in ours.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and all("forward" in m.__dict__ for m in norms)  # every RMSNorm takes our kernel
    batch = tokenizer(["The cat sat on the warm mat.", "Rain falls softly on the roof today"],
                      return_tensors="pt", padding=True)  # fmt: skip
    calls = {"forward": 0, "backward": 0}
    monkeypatch.setattr(layer_split, "_VERIFIED", {})  # its first call checks the layer split's rule: +1 MLP
    for name, function in (("forward", "stacked_forward_h"), ("backward", "stacked_backward")):
        original = getattr(stacked_lora, function)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(stacked_lora, function, counted)
    loss_ours, grads_ours = _loss_and_grads(ours, batch)
    layers = ours.config.num_hidden_layers
    # NF4 bases run Q/K/V and gate/up stacked (forward, checkpoint recompute, backward); 16-bit ones do not.
    # The output and down projections run as stacks of one in forward (stacked_lora's concatenation). The
    # output projection's recompute computes only X A^T where its output goes straight to the residual
    # (all but Gemma 2); the MLP's recompute skips down likewise. The layer split's rule check runs one
    # MLP (+2). The recompute takes the Q/K/V products kept from the forward where the checkpoint keeps
    # them (offloaded_checkpointing.QKV_EVERY: every QKV_EVERY-th layer but the last).
    o_proj = layers if RULES[arch].attention_output_to_residual else 2 * layers
    down = layers if RULES[arch].mlp_output_to_residual else 2 * layers
    kept_qkv = len(range(0, layers - 1, oc.QKV_EVERY)) if oc.QKV_EVERY > 0 else 0
    expected = (2 * 2 * layers + o_proj + down + 2 - kept_qkv, 2 * layers) if load_in_4bit else (0, 0)
    assert (calls["forward"], calls["backward"]) == expected
    loss_plain, grads_plain = _loss_and_grads(plain, batch)
    assert torch.allclose(loss_ours, loss_plain, rtol=1e-5, atol=1e-6)
    assert grads_ours.keys() == grads_plain.keys() and len(grads_ours) > 0
    assert all("lora_" in name for name in grads_ours)
    for name in grads_ours:
        # atol on the gradient's scale: see tests/models/test_attention_patch.py::_assert_same_grads.
        # Typically within 2e-6 of the gradient's largest entry; the worst seed seen (1115334081, qwen3,
        # 4-bit, layer 0's v_proj lora_A, also before the 2026-12-07 changes) reached 4.4e-5.
        atol = max(1e-6, 1e-4 * grads_plain[name].abs().max().item())
        torch.testing.assert_close(grads_ours[name], grads_plain[name], rtol=1e-4, atol=atol, msg=name)


def test_training_follows_the_same_loss_curve(saved_models, seed):
    ours, plain, tokenizer = _pair(saved_models["llama"], True, seed % 1000)
    batch = tokenizer(["Tomatoes are red and the sky is blue."], return_tensors="pt")
    curves = []
    for model in (ours, plain):
        # eps=1e-6: Adam's first steps turn near-zero gradients into full-size updates, which would
        # amplify float-rounding differences between two correct implementations into noise. lr=1e-3: at
        # 3e-3 some seeds (3530478755) drove the loss into oscillation near step 26, where the two curves,
        # within 7e-5 until then, parted by 0.07; at 1e-3 the worst of 9 seeds differed by 2.6e-5.
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, eps=1e-6)
        losses = []
        for _ in range(30):
            loss = model(**batch, labels=batch["input_ids"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves.append(losses)
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(curves[1]), rtol=5e-3, atol=5e-3)
    assert curves[0][-1] < 0.95 * curves[0][0]


def test_generation_with_adapters_and_unpatch(saved_models):
    model, tokenizer = FastLanguageModel.from_pretrained(saved_models["qwen3"], dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, init_lora_weights=False)
    FastLanguageModel.for_inference(model)
    batch = tokenizer(["Hello"], return_tensors="pt")
    with torch.no_grad():
        fused = model.generate(**batch, max_new_tokens=6, do_sample=False)
        FastLanguageModel.unpatch(model)
        plain = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(fused, plain)


@pytest.mark.parametrize("arch", testing.ARCHITECTURES)
def test_train_and_eval_switches_keep_the_fused_forwards(saved_models, arch):
    """transformers 5.2x kernelizes some layers (RMSNorm) by default and again at every train()/eval()
    switch, resetting their forward: patching turns that off, so every fused forward survives the switches
    (the RMSNorms lost theirs at the first model.train() until 2026-12-07)."""
    model, tokenizer = FastLanguageModel.from_pretrained(saved_models[arch], load_in_4bit=True, dtype=torch.float32)
    assert getattr(model, "use_kernels", False) is False  # not even fetched at load
    model = FastLanguageModel.get_peft_model(model, r=4)
    patched = [m for m in model.modules() if m.__dict__.get("_loraforge_patched")]
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and set(map(id, norms)) <= set(map(id, patched))
    switches = (lambda: model.train(), lambda: model.eval(), lambda: model.train(),
                lambda: FastLanguageModel.for_inference(model), lambda: FastLanguageModel.for_training(model))  # fmt: skip
    for i, switch in enumerate(switches):
        switch()
        assert all("forward" in m.__dict__ for m in patched), f"switch {i}"
    calls = []
    from loraforge.ops import rmsnorm

    real = rmsnorm.rms_norm_op
    rmsnorm_calls = lambda *args: calls.append(1) or real(*args)
    try:
        rmsnorm.rms_norm_op = rmsnorm_calls
        model(**tokenizer(["A dog ran"], return_tensors="pt"))
    finally:
        rmsnorm.rms_norm_op = real
    assert len(calls) >= len(norms)


def test_bad_input(saved_models):
    path = saved_models["llama"]
    with pytest.raises(ValueError, match="max_seq_length"):
        FastLanguageModel.from_pretrained(path, max_seq_length=100_000)
    with pytest.raises(TypeError, match="dtype"):
        FastLanguageModel.from_pretrained(path, dtype=torch.int8)
    model, _ = FastLanguageModel.from_pretrained(path, load_in_4bit=False)
    with pytest.raises(ValueError, match="r must be a positive int"):
        FastLanguageModel.get_peft_model(model, r=0)
    with pytest.raises(ValueError, match="target_modules"):
        FastLanguageModel.get_peft_model(model, target_modules=["not_a_proj"])


def test_rope_scaling_allows_a_longer_context(saved_models):
    model, tokenizer = FastLanguageModel.from_pretrained(saved_models["llama"], max_seq_length=1024, dtype=torch.float32,
                                                         rope_scaling={"rope_type": "linear", "factor": 4.0})  # fmt: skip
    assert model.config.rope_parameters["rope_type"] == "linear" and tokenizer.model_max_length == 1024


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_offloaded_checkpointing_gives_the_same_gradients(saved_models, device, seed):
    grads = {}
    for mode in ("unsloth", True, False):
        model, tokenizer = FastLanguageModel.from_pretrained(saved_models["gemma2"], dtype=torch.float32,
                                                             device_map="auto" if device == "cuda" else None)  # fmt: skip
        model = FastLanguageModel.get_peft_model(model, r=4, random_state=seed % 1000, init_lora_weights=False,
                                                 use_gradient_checkpointing=mode)  # fmt: skip
        batch = tokenizer(["Snow is white and cold."], return_tensors="pt").to(device)
        assert model.base_model.model.model.layers[0].gradient_checkpointing is bool(mode)
        _, grads[mode] = _loss_and_grads(model, batch)
    for name in grads[False]:
        assert_same_gradients(grads["unsloth"][name], grads[False][name])
        assert_same_gradients(grads[True][name], grads[False][name])
    with pytest.raises(ValueError, match="use_gradient_checkpointing"):
        FastLanguageModel.get_peft_model(model, use_gradient_checkpointing="sometimes")


def test_last_layers_kept_out_of_the_offloaded_checkpoint(saved_models, seed, monkeypatch):
    """KEEP_LAST_LAYERS = 1: the last decoder layer runs as it is (no recompute), the others through the
    checkpoint, and the gradients are those of the fully checkpointed model; above KEEP_LAST_MAX_TOKENS
    tokens in the batch every layer is checkpointed."""
    from loraforge.train import offloaded_checkpointing as oc

    grads, checkpointed = {}, {}
    for keep, max_tokens in ((0, 8192), (1, 8192), (1, 15)):  # 2 x 10 tokens: above a cap of 15
        monkeypatch.setattr(oc, "KEEP_LAST_MAX_TOKENS", max_tokens)
        monkeypatch.setattr(oc, "KEEP_LAST_LAYERS", keep)
        monkeypatch.setattr(oc, "_KEPT_LAYERS", weakref.WeakSet())
        model, tokenizer = FastLanguageModel.from_pretrained(saved_models["llama"], dtype=torch.float32)
        model = FastLanguageModel.get_peft_model(model, r=4, random_state=seed % 1000, init_lora_weights=False,
                                                 use_gradient_checkpointing="unsloth")  # fmt: skip
        layers = model.base_model.model.model.layers
        assert set(oc._KEPT_LAYERS) == set(layers[len(layers) - keep :])
        keep = keep if max_tokens > 15 else "over the cap"
        calls = []
        real = oc._CheckpointedLayer.apply
        counted = lambda *a, calls=calls, real=real: calls.append(1) or real(*a)
        monkeypatch.setattr(oc._CheckpointedLayer, "apply", counted)
        batch = tokenizer(["Snow is white and cold.", "A dog ran"], return_tensors="pt", padding=True)
        _, grads[keep] = _loss_and_grads(model, batch)
        checkpointed[keep] = len(calls)
        monkeypatch.setattr(oc._CheckpointedLayer, "apply", real)
    assert checkpointed == {0: len(layers), 1: len(layers) - 1, "over the cap": len(layers)}
    for name in grads[0]:
        for other in (1, "over the cap"):
            assert_same_gradients(grads[other][name], grads[0][name])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("gate_up, qkv, arch", [(1, 0, "llama"), (0, 1, "llama")]
                         + [(1, 1, arch) for arch in testing.ARCHITECTURES])  # fmt: skip
def test_products_kept_from_the_forward_give_the_same_gradients(saved_models, device, gate_up, qkv, arch, seed,
                                                                monkeypatch):  # fmt: skip
    """GATE_UP_EVERY / QKV_EVERY = 1: the first layer's fused MLP and Q/K/V hand their stacked products to
    the checkpoint (on a GPU: offloaded to host and prefetched back) and the layer's rerun takes them
    instead of recomputing them (one stacked forward of each kind fewer); the gradients are those of the
    plain recompute. On a GPU every saved tensor is offloaded, however small (the tiny model's are)."""
    from loraforge.models import stacked_lora
    from loraforge.train import offloaded_checkpointing as oc

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setattr(oc, "_MIN_OFFLOAD_BYTES", 0)
    monkeypatch.setattr(oc, "KEEP_LAST_LAYERS", 0)  # every layer checkpointed, as counted below
    monkeypatch.setattr(oc, "ATTENTION_EVERY", 0)  # (the kept attention has its own test, below)
    grads, forwards = {}, {}
    for setting in ((0, 0, 8192), (gate_up, qkv, 8192), (gate_up, qkv, 15)):  # 2 x 10 tokens: over a cap of 15
        monkeypatch.setattr(oc, "GATE_UP_EVERY", setting[0])
        monkeypatch.setattr(oc, "QKV_EVERY", setting[1])
        monkeypatch.setattr(oc, "KEPT_PRODUCTS_MAX_TOKENS", setting[2])
        monkeypatch.setattr(oc, "_KEPT_PRODUCTS", weakref.WeakKeyDictionary())
        device_map = "auto" if device == "cuda" else None
        model, tokenizer = FastLanguageModel.from_pretrained(saved_models[arch], load_in_4bit=True, dtype=torch.float32,
                                                             device_map=device_map)  # fmt: skip
        model = FastLanguageModel.get_peft_model(model, r=4, random_state=seed % 1000, init_lora_weights=False,
                                                 use_gradient_checkpointing="unsloth")  # fmt: skip
        layers = model.base_model.model.model.layers
        kinds = {"gate_up"} if setting[0] else set()  # chosen whatever the cap: it applies per call
        kinds |= {"qkv"} if setting[1] else set()
        # all but the last layer, every first: the first of two
        assert dict(oc._KEPT_PRODUCTS) == ({layers[0]: kinds} if kinds else {})
        calls = []
        real = stacked_lora.stacked_forward_h

        def counted(projs, *args, _calls=calls, _real=real, **kwargs):
            _calls.append(len(projs))  # 2: gate/up, 3: Q/K/V
            return _real(projs, *args, **kwargs)

        monkeypatch.setattr(stacked_lora, "stacked_forward_h", counted)
        batch = tokenizer(["Snow is white and cold.", "A dog ran"], return_tensors="pt", padding=True).to(device)
        model.train()
        model(**batch, labels=batch["input_ids"])  # a first forward: the layer split checks its rule once
        calls.clear()
        _, grads[setting] = _loss_and_grads(model, batch)
        forwards[setting] = (calls.count(2), calls.count(3))
        monkeypatch.setattr(stacked_lora, "stacked_forward_h", real)
    # 2 layers: forward and recompute of each; the first layer's recompute takes what it kept (not over the
    # cap of tokens)
    assert forwards == {(0, 0, 8192): (4, 4), (gate_up, qkv, 8192): (4 - gate_up, 4 - qkv), (gate_up, qkv, 15): (4, 4)}
    for setting in ((gate_up, qkv, 8192), (gate_up, qkv, 15)):
        for name in grads[(0, 0, 8192)]:
            assert_same_gradients(grads[setting][name], grads[(0, 0, 8192)][name], msg=name)


@pytest.mark.gpu
def test_cuda_copy_pacing_gives_up_kept_products_with_the_same_gradients(saved_models, seed, monkeypatch):
    """train/copy_pacing.py on a GPU: a forward's copies to host are timed (busy over span in (0, 1]), and with
    every reading taken as copy-bound (COPY_BOUND_RATIO 0) the kept products go kind by kind, one a forward
    (the attention output, gate/up, Q/K/V); every step's loss and gradients equal a model's that keeps none."""
    from loraforge.train import copy_pacing
    from loraforge.train import offloaded_checkpointing as oc

    monkeypatch.setattr(oc, "_MIN_OFFLOAD_BYTES", 0)
    monkeypatch.setattr(oc, "KEEP_LAST_LAYERS", 0)
    monkeypatch.setattr(copy_pacing, "COPY_BOUND_RATIO", 0.0)
    steps = {}
    for every in (0, 1):
        for name in ("GATE_UP_EVERY", "QKV_EVERY", "ATTENTION_EVERY"):
            monkeypatch.setattr(oc, name, every)
        monkeypatch.setattr(oc, "_KEPT_PRODUCTS", weakref.WeakKeyDictionary())
        model, tokenizer = FastLanguageModel.from_pretrained(saved_models["llama"], load_in_4bit=True,
                                                             dtype=torch.float32, device_map="auto")  # fmt: skip
        model = FastLanguageModel.get_peft_model(model, r=4, random_state=seed % 1000, init_lora_weights=False,
                                                 use_gradient_checkpointing="unsloth")  # fmt: skip
        layers = model.base_model.model.model.layers
        assert dict(oc._KEPT_PRODUCTS) == ({layers[0]: {"gate_up", "qkv", "attention"}} if every else {})
        batch = tokenizer(["Snow is white and cold.", "A dog ran"], return_tensors="pt", padding=True).to("cuda")
        steps[every] = [_loss_and_grads(model, batch) for _ in range(5)]
        torch.cuda.synchronize()
        pacing = copy_pacing.PACING
        # forward 1 is not measured; forwards 3, 4 and 5 each begin by reading the one before
        assert pacing.given_up == (["attention", "gate_up", "qkv"] if every else [])
        assert not any(oc._KEPT_PRODUCTS.values()) and pacing.done
        assert 0 < pacing.last["ratio"] <= 1 + 1e-6 and pacing.last["gb_per_s"] > 0
    for (loss, grads), (loss_kept, grads_kept) in zip(steps[0], steps[1]):
        assert torch.equal(loss, loss_kept)
        for name in grads:
            assert_same_gradients(grads_kept[name], grads[name], msg=name)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("arch", testing.ARCHITECTURES)
def test_norms_write_into_the_stacked_products_wide_inputs(saved_models, device, arch, seed, monkeypatch):
    """From the second step on, every RMSNorm that feeds Q/K/V or gate/up writes its output with the rows
    padded for the adapter columns, and every stacked Q/K/V and gate/up product (forward and rerun) reads
    [X | H] in place (stacked_lora.NORM_INTO_WIDE); the loss and gradients are those without it."""
    from loraforge.models import stacked_lora

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    results = {}
    for on in (False, True):
        monkeypatch.setattr(stacked_lora, "NORM_INTO_WIDE", on)
        model, tokenizer = FastLanguageModel.from_pretrained(saved_models[arch], load_in_4bit=True, dtype=torch.float32,
                                                             device_map="auto" if device == "cuda" else None)  # fmt: skip
        model = FastLanguageModel.get_peft_model(model, r=4, random_state=seed % 1000, init_lora_weights=False,
                                                 use_gradient_checkpointing="unsloth")  # fmt: skip
        batch = tokenizer(["Snow is white and cold.", "A dog ran"], return_tensors="pt", padding=True).to(device)
        _loss_and_grads(model, batch)  # the first step: the norms learn the padding
        in_place = []
        real = stacked_lora._forward_concat

        def recording(projs, x, *args, _real=real, _log=in_place):
            wide = args[3] if len(args) > 3 else None
            if len(projs) > 1:  # Q/K/V, gate/up
                _log.append(wide is not None and wide.data_ptr() == x.data_ptr())
            return _real(projs, x, *args)

        monkeypatch.setattr(stacked_lora, "_forward_concat", recording)
        results[on] = (*_loss_and_grads(model, batch), in_place)
        monkeypatch.setattr(stacked_lora, "_forward_concat", real)
    layers = len(model.base_model.model.model.layers)
    assert len(results[True][2]) >= 2 * layers and all(results[True][2]), results[True][2]
    assert not any(results[False][2])
    padded = [m for m in model.modules() if m.__dict__.get(stacked_lora.ROW_PADDING)]
    assert len(padded) == 2 * layers  # one norm before the attention, one before the MLP, per layer
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-6, atol=1e-6)
    for name in results[False][1]:
        assert_same_gradients(results[True][1][name], results[False][1][name], msg=name)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("qkv", [0, 1])
@pytest.mark.parametrize("arch", testing.ARCHITECTURES)
def test_attention_kept_from_the_forward_gives_the_same_gradients(saved_models, device, qkv, arch, seed, monkeypatch):
    """ATTENTION_EVERY = 1: the first layer's checkpointed forward keeps its attention's output and
    log-sum-exp (models/kept_attention.py; on a GPU offloaded to host and prefetched back) and its rerun
    runs no attention forward; the gradients are those of the plain recompute, with or without the kept
    Q/K/V. Gemma 2's attention (eager, soft-capped) is not one it reproduces: nothing is kept there."""
    import torch.nn.functional as F

    from loraforge.models import kept_attention
    from loraforge.train import offloaded_checkpointing as oc

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16  # (CUDA's flash and cuDNN kernels: 16-bit only)
    monkeypatch.setattr(oc, "_MIN_OFFLOAD_BYTES", 0)
    monkeypatch.setattr(oc, "KEEP_LAST_LAYERS", 0)  # every layer checkpointed, as counted below
    monkeypatch.setattr(oc, "QKV_EVERY", qkv)
    grads, counts = {}, {}
    for every in (0, 1):
        monkeypatch.setattr(oc, "ATTENTION_EVERY", every)
        monkeypatch.setattr(oc, "_KEPT_PRODUCTS", weakref.WeakKeyDictionary())
        model, tokenizer = FastLanguageModel.from_pretrained(saved_models[arch], load_in_4bit=True, dtype=dtype,
                                                             device_map="auto" if device == "cuda" else None)  # fmt: skip
        model = FastLanguageModel.get_peft_model(model, r=4, random_state=seed % 1000, init_lora_weights=False,
                                                 use_gradient_checkpointing="unsloth")  # fmt: skip
        # no padding, so no mask: SDPA's causal path, the one kept
        ids = tokenizer(["Snow is white and cold today.", "A dog ran after the red ball."])["input_ids"]
        length = min(len(row) for row in ids)
        batch = {"input_ids": torch.tensor([row[:length] for row in ids], device=device)}
        model.train()
        model(**batch, labels=batch["input_ids"])  # a first forward: the layer split checks its rule once
        calls = {"sdpa": 0, "kept forward": 0}
        real_sdpa, real_forward = F.scaled_dot_product_attention, kept_attention.attention_forward

        def sdpa(*args, _calls=calls, _real=real_sdpa, **kwargs):
            _calls["sdpa"] += 1
            return _real(*args, **kwargs)

        def kept_forward(*args, _calls=calls, _real=real_forward, **kwargs):
            _calls["kept forward"] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
        monkeypatch.setattr(kept_attention, "attention_forward", kept_forward)
        _, grads[every] = _loss_and_grads(model, batch)
        counts[every] = dict(calls)
        monkeypatch.setattr(F, "scaled_dot_product_attention", real_sdpa)
        monkeypatch.setattr(kept_attention, "attention_forward", real_forward)
    if arch == "gemma2":
        assert counts[1]["kept forward"] == 0
    elif device == "cpu":  # 2 layers, forward and rerun of each: the first layer's forward keeps, its rerun takes
        assert counts == {0: {"sdpa": 4, "kept forward": 0}, 1: {"sdpa": 2, "kept forward": 1}}
    else:  # (where SDPA offers neither cuDNN nor flash for the tiny heads, nothing is kept)
        assert counts[0] == {"sdpa": 4, "kept forward": 0} and counts[1]["kept forward"] in (0, 1)
        assert counts[1]["sdpa"] == 4 - 2 * counts[1]["kept forward"]
    for name in grads[0]:
        if dtype == torch.float32:
            assert_same_gradients(grads[1][name], grads[0][name], msg=name)
        else:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=2e-2, atol=1e-3, msg=name)


def test_training_loss_takes_the_fused_cross_entropy(saved_models):
    ours, plain, tokenizer = _pair(saved_models["gemma2"], False, 0)  # gemma2: final logit softcapping
    batch = tokenizer(["Blue whales sing."], return_tensors="pt")
    ours.train()
    out = ours(**batch, labels=batch["input_ids"])
    assert out.logits is None  # the fused path never forms logits
    expected = plain(**batch, labels=batch["input_ids"])
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    ours.eval()
    assert ours(**batch, labels=batch["input_ids"]).logits is not None  # evaluation keeps logits
    # num_items_in_batch (gradient accumulation): sum over tokens / the given count
    ours.train()
    plain.train()
    n = int((batch["input_ids"][:, 1:] != -100).sum()) + 3
    a = ours(**batch, labels=batch["input_ids"], num_items_in_batch=torch.tensor(n)).loss
    b = plain(**batch, labels=batch["input_ids"], num_items_in_batch=torch.tensor(n)).loss
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_bf16_qlora_on_gpu_matches_peft(tmp_path, arch, seed):
    """On CUDA in bf16 (our NF4 CUDA dequant, fused LoRA, Triton fused CE) against plain PEFT +
    bitsandbytes: the same loss to bf16 precision, and LoRA gradients pointing the same way."""
    path = testing.save_tiny_model(tmp_path / arch, arch=arch, seed=3, hidden_size=256, intermediate_size=512)
    models = []
    for _ in range(2):
        model, tokenizer = FastLanguageModel.from_pretrained(path, dtype=torch.bfloat16)
        models.append(FastLanguageModel.get_peft_model(model, r=8, random_state=seed % 1000, init_lora_weights=False))
    ours, plain = models
    lf_patch.unpatch_model(plain)
    batch = tokenizer(["The quick brown fox jumps over the lazy dog."] * 2, return_tensors="pt").to("cuda")
    loss_ours, grads_ours = _loss_and_grads(ours, batch)
    loss_plain, grads_plain = _loss_and_grads(plain, batch)
    torch.testing.assert_close(loss_ours.float(), loss_plain.float(), rtol=2e-2, atol=2e-2)
    for name in grads_ours:
        a, b = grads_ours[name].float().flatten(), grads_plain[name].float().flatten()
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.98, name


def test_peft_merge_and_unload_works_on_our_4bit_loads(saved_models):
    model, tokenizer = FastLanguageModel.from_pretrained(saved_models["llama"], dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, init_lora_weights=False, use_gradient_checkpointing=False)
    assert callable(model.save_pretrained_merged) and callable(model.save_pretrained_gguf)
    batch = tokenizer(["Green leaves"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
        merged = model.merge_and_unload()
        after = merged(**batch).logits
    assert (before - after).abs().max() < 0.5  # NF4 requantization of the merged weight


def test_full_finetuning_and_16bit_lora_train(saved_models):
    batch = None
    for kwargs in ({"full_finetuning": True}, {"load_in_4bit": False}):
        model, tokenizer = FastLanguageModel.from_pretrained(saved_models["mistral"], dtype=torch.float32, **kwargs)
        if kwargs.get("full_finetuning"):
            assert all(p.requires_grad for p in model.parameters())
            assert not any(type(m).__name__ == "Linear4bit" for m in model.modules())
        else:
            model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=True)
        batch = tokenizer(["Bread is baked in a hot oven."], return_tensors="pt")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        model.train()
        for _ in range(8):
            loss = model(**batch, labels=batch["input_ids"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert losses[-1] < losses[0]


@pytest.mark.gpu
def test_cached_cuda_dequantization_equals_the_op(seed):
    """base_weight's direct _core call (cached per layer) gives the op's bits, and follows a swapped weight."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import bitsandbytes as bnb

    from loraforge import nf4
    from loraforge.models import base_weight

    layers = []
    for shape in ((96, 320), (37, 64)):
        layer = bnb.nn.Linear4bit(shape[1], shape[0], bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(shape, dtype=torch.bfloat16), requires_grad=False,
                                         quant_type="nf4", compress_statistics=True)  # fmt: skip
        layers.append(layer.cuda())
    for layer in layers:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            expected = nf4.dequantize(layer.weight.data, layer.weight.quant_state, out_dtype=dtype)
            assert torch.equal(base_weight.dense_weight(layer, dtype), expected)
        assert "_loraforge_dequant" in layer.__dict__  # the cached direct call was taken
    # The first layer takes the second's weight: the cache notices and follows.
    layers[0].weight = layers[1].weight
    expected = nf4.dequantize(layers[1].weight.data, layers[1].weight.quant_state, out_dtype=torch.bfloat16)
    assert torch.equal(base_weight.dense_weight(layers[0], torch.bfloat16), expected)


def test_adapter_casts_are_cached_until_the_parameter_changes(seed):
    from loraforge.models.lora_autograd import adapter_in

    weight = torch.nn.Parameter(torch.randn(4, 6))
    first = adapter_in(weight, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and torch.equal(first, weight.detach().to(torch.bfloat16))
    assert adapter_in(weight, torch.bfloat16) is first  # no new cast while the weight is unchanged
    assert adapter_in(weight, torch.float32) is weight
    with torch.no_grad():
        weight.add_(1.0)  # what an optimizer step does: an in-place update bumps the version
    second = adapter_in(weight, torch.bfloat16)
    assert second is not first and torch.equal(second, weight.detach().to(torch.bfloat16))
    # torch's fused AdamW (Trainer's default) writes the parameter without bumping its version: the
    # optimizer-step count in the key catches it.
    weight.grad = torch.randn_like(weight)
    version = weight._version
    torch.optim.AdamW([weight], lr=0.5, fused=True).step()
    assert weight._version == version  # the case the step count is there for
    third = adapter_in(weight, torch.bfloat16)
    assert torch.equal(third, weight.detach().to(torch.bfloat16))
