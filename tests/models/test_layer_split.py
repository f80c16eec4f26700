"""The offloaded checkpoint in halves (train/layer_split.py): backward reruns each layer's MLP half
from the saved h1 first and its attention half after, with the gradients of no checkpointing; the
output projection's matmul is skipped in the attention half's rerun where its output goes straight to
the residual; a layer whose forward does not match its rule falls back to the whole-layer recompute."""

import pytest
import torch

from loraforge.models import FastLanguageModel, lora_autograd
from loraforge.train import layer_split
from tests.models._same_gradients import assert_same_gradients


@pytest.fixture(autouse=True)
def _every_layer_checkpointed(monkeypatch):
    """These tests count what each layer's recompute does: no layer is kept out of the checkpoint
    (offloaded_checkpointing.KEEP_LAST_LAYERS, tested in test_fast_language_model.py)."""
    from loraforge.train import offloaded_checkpointing

    monkeypatch.setattr(offloaded_checkpointing, "KEEP_LAST_LAYERS", 0)


def _train_step(path, mode, seed, record=None):
    model, tokenizer = FastLanguageModel.from_pretrained(path, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, random_state=seed % 1000, init_lora_weights=False,
                                             use_gradient_checkpointing=mode)  # fmt: skip
    model.train()
    handles = []
    if record is not None:  # which half runs when, during backward
        for module in model.modules():
            for name in ("self_attn", "mlp"):
                child = module._modules.get(name)
                if child is not None and not isinstance(module, type(child)):
                    handles.append(child.register_forward_pre_hook(lambda _m, _a, n=name: record.append(n)))
    batch = tokenizer(["Snow is white and cold.", "Grass is green."], return_tensors="pt", padding=True)
    loss = model(**batch, labels=batch["input_ids"]).loss
    if record is not None:
        record.clear()  # keep only backward's reruns
    loss.backward()
    for handle in handles:
        handle.remove()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, model


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"])
def test_halves_run_mlp_first_with_the_gradients_of_no_checkpointing(saved_models, arch, seed, monkeypatch):
    monkeypatch.setattr(layer_split, "_VERIFIED", {})
    plain, _ = _train_step(saved_models[arch], False, seed)
    order = []
    ours, model = _train_step(saved_models[arch], "unsloth", seed, order)
    layers = model.config.num_hidden_layers
    assert order == ["mlp", "self_attn"] * layers  # each layer: MLP half, then attention half
    for name in plain:
        assert_same_gradients(ours[name], plain[name])

    monkeypatch.setattr(layer_split, "ENABLED", False)  # the whole-layer recompute: attention first
    order.clear()
    whole, _ = _train_step(saved_models[arch], "unsloth", seed, order)
    assert order == ["self_attn", "mlp"] * layers
    for name in plain:
        assert_same_gradients(whole[name], plain[name])


@pytest.mark.parametrize("arch, skips", [("llama", True), ("gemma2", False)])
def test_attention_half_skips_the_output_projection_where_it_feeds_the_residual(saved_models, arch, skips, seed,
                                                                                   monkeypatch):  # fmt: skip
    monkeypatch.setattr(layer_split, "_VERIFIED", {})
    flags = []
    real = lora_autograd.LoRALinearFunction.forward

    def counting(ctx, x, A, B, proj, output_unused=False):
        flags.append(output_unused)
        return real(ctx, x, A, B, proj, output_unused)

    monkeypatch.setattr(lora_autograd.LoRALinearFunction, "forward", staticmethod(counting))
    plain, _ = _train_step(saved_models[arch], False, seed)
    assert flags and not any(flags)
    flags.clear()
    ours, model = _train_step(saved_models[arch], "unsloth", seed)
    layers = model.config.num_hidden_layers
    # o_proj: once a layer in forward, once in the attention half's rerun (skipped where allowed)
    assert flags == [False] * layers + [skips] * layers
    for name in plain:
        assert_same_gradients(ours[name], plain[name])


def test_unit_output_unused_projection_gives_the_same_gradients(seed):
    from loraforge.models.lora_autograd import LoRALinearFunction, LoRAProjection

    base = torch.nn.Linear(24, 10, bias=False)
    a, b = torch.randn(4, 24, requires_grad=True), torch.randn(10, 4, requires_grad=True)
    proj = LoRAProjection(base, a, b, 0.5)
    x, dy = torch.randn(3, 7, 24), torch.randn(3, 7, 10)
    grads = []
    for unused in (False, True):
        xi = x.clone().requires_grad_()
        y = LoRALinearFunction.apply(xi, a, b, proj, unused)
        assert y.shape == (3, 7, 10)
        if unused:
            assert not y.any() and y.stride() == (0, 0, 0)
        y.backward(dy)
        grads.append([xi.grad.clone(), a.grad.clone(), b.grad.clone()])
        a.grad = b.grad = None
    for computed, skipped in zip(*grads):
        assert torch.equal(computed, skipped)


def test_a_layer_that_does_not_match_its_rule_recomputes_whole(saved_models, seed, monkeypatch):
    monkeypatch.setattr(layer_split, "_VERIFIED", {})
    wrong = ("post_attention_layernorm", ("mlp",), lambda layer, h1: layer.mlp(h1))  # the norm left out
    monkeypatch.setitem(layer_split.MLP_HALVES, "pre_norm", wrong)
    plain, _ = _train_step(saved_models["llama"], False, seed)
    order = []
    with pytest.warns(UserWarning, match="does not match loraforge's 'pre_norm' rule"):
        ours, model = _train_step(saved_models["llama"], "unsloth", seed, order)
    assert order == ["self_attn", "mlp"] * model.config.num_hidden_layers
    for name in plain:
        assert_same_gradients(ours[name], plain[name])


def _counting(calls: dict, key: str, real):
    def counted(*args):
        calls[key] += 1
        return real(*args)

    return counted


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_reruns_form_no_residual_sum(saved_models, arch, seed, monkeypatch):
    """Both phases stop at their residual branch (the MLP half's output and h1 are never formed) and the
    gradients are those of no checkpointing; where h1 = x + branch did not hold at the layer class's
    first forward (here: a branch end that reads the wrong module), phase 2 stops at h1 as before;
    RESIDUAL_FREE off forms both sums again."""
    from loraforge.train import offloaded_checkpointing as oc

    monkeypatch.setattr(layer_split, "_VERIFIED", {})
    plain, _ = _train_step(saved_models[arch], False, seed)
    rule = "pre_norm" if arch == "llama" else "sandwich"
    real_branch, real_half, real_plus = layer_split.attention_branch, layer_split.attention_half, oc._plus_residual
    for wrong_end, switched_off in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(layer_split, "_BRANCH_VERIFIED", {})
        monkeypatch.setattr(layer_split, "RESIDUAL_FREE", not switched_off)
        if wrong_end:
            monkeypatch.setitem(layer_split.ATTENTION_BRANCH_ENDS, rule, ("input_layernorm", lambda output: output))
        calls = {"branch": 0, "half": 0, "sums": 0}
        monkeypatch.setattr(layer_split, "attention_branch", _counting(calls, "branch", real_branch))
        monkeypatch.setattr(layer_split, "attention_half", _counting(calls, "half", real_half))
        monkeypatch.setattr(oc, "_plus_residual", _counting(calls, "sums", real_plus))
        ours, model = _train_step(saved_models[arch], "unsloth", seed)
        layers = model.config.num_hidden_layers
        if switched_off:  # LORAFORGE_RESIDUAL_FREE_RERUN=0: both sums formed and backpropagated
            assert calls == {"branch": 0, "half": layers, "sums": 0}
        elif wrong_end:  # phase 1 still adds the residual's gradient itself; phase 2 backpropagates h1
            assert calls == {"branch": 0, "half": layers, "sums": layers}
        else:  # each layer: phase 1's and phase 2's residual gradient, added by hand
            assert calls == {"branch": layers, "half": 0, "sums": 2 * layers}
        for name in plain:
            assert_same_gradients(ours[name], plain[name], msg=name)


def test_unpatch_removes_the_split(saved_models):
    model, _ = FastLanguageModel.from_pretrained(saved_models["llama"], dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing="unsloth")
    layers = [m for m in model.modules() if "mlp" in m._modules and "self_attn" in m._modules]
    assert layers and all(layer_split.rule_of(layer) == ("pre_norm", True) for layer in layers)
    assert all(len(layer.post_attention_layernorm._forward_pre_hooks) == 1 for layer in layers)
    assert all(len(layer.self_attn._forward_hooks) == 1 for layer in layers)  # the attention branch's end
    from loraforge.models.patch import unpatch_model

    unpatch_model(model)
    assert all(layer_split.rule_of(layer) is None for layer in layers)
    assert all(len(layer.post_attention_layernorm._forward_pre_hooks) == 0 for layer in layers)
    assert all(len(layer.self_attn._forward_hooks) == 0 for layer in layers)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_halves_offloaded_on_gpu_match_no_checkpointing(tmp_path, arch, seed, monkeypatch):
    """On CUDA with layer inputs and h1 large enough to go to host memory (>= 1 MiB): the two-phase
    backward, prefetches and the newest tensor kept on the GPU give the gradients of no checkpointing."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from loraforge import testing
    from loraforge.train import offloaded_checkpointing as oc

    monkeypatch.setattr(layer_split, "_VERIFIED", {})
    path = testing.save_tiny_model(tmp_path / arch, arch=arch, seed=3, hidden_size=256, intermediate_size=512)
    ids = torch.randint(3, 200, (2, 600), generator=torch.Generator().manual_seed(seed))  # 2 x 600 x 256 fp32
    restores = []
    real_restore = oc._Offloaded.restore
    monkeypatch.setattr(oc._Offloaded, "restore", lambda self, side: restores.append(1) or real_restore(self, side))
    grads = {}
    for mode in ("unsloth", False):
        model, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32, load_in_4bit=False)
        model = FastLanguageModel.get_peft_model(model, r=4, random_state=seed % 1000, init_lora_weights=False,
                                                 use_gradient_checkpointing=mode)  # fmt: skip
        model.cuda().train()
        batch = ids.cuda()
        model(input_ids=batch, labels=batch).loss.backward()
        grads[mode] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(restores) == 2 * model.config.num_hidden_layers  # x and h1 of every layer came back
    for name in grads[False]:
        torch.testing.assert_close(grads["unsloth"][name], grads[False][name], rtol=1e-4, atol=1e-6)
