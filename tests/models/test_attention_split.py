"""The experimental per-key/value-head SDPA split (attention.ATTENTION_SPLIT_TOKENS): the same loss and
LoRA gradients as one SDPA call over all heads, and not taken where it does not apply."""

import pytest
import torch

from loraforge.models import FastLanguageModel
from loraforge.models import attention as lf_attention

pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")


def _loss_and_grads(path, seed):
    model, _ = FastLanguageModel.from_pretrained(path, load_in_4bit=False, dtype=torch.float32,
                                                 attn_implementation="sdpa")  # fmt: skip
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=seed, init_lora_weights=False,
                                             use_gradient_checkpointing="unsloth")  # fmt: skip
    model.train()
    ids = torch.randint(3, 200, (2, 23), generator=torch.Generator().manual_seed(seed))
    loss = model(input_ids=ids, labels=ids).loss  # no attention_mask: SDPA runs unmasked (causal)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ("llama", "qwen3", "gemma"))  # plain, q/k norms, GeGLU + scaled embeddings
def test_split_by_kv_head_equals_one_call(saved_models, arch, seed, monkeypatch):
    calls = []
    original = lf_attention._split_by_kv_head

    def recorded(*args):
        calls.append(original(*args))
        return calls[-1]

    monkeypatch.setattr(lf_attention, "_split_by_kv_head", recorded)
    loss, grads = _loss_and_grads(saved_models[arch], seed % 1000)
    assert calls and not any(calls)  # off by default
    calls.clear()
    monkeypatch.setattr(lf_attention, "ATTENTION_SPLIT_TOKENS", 8)
    split_loss, split_grads = _loss_and_grads(saved_models[arch], seed % 1000)
    assert calls and all(calls)  # every call split (23 tokens >= 8, no mask, 4 query heads over 2 kv heads)
    torch.testing.assert_close(split_loss, loss, rtol=1e-6, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(split_grads[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_split_not_taken_with_a_mask_or_below_the_length(monkeypatch):
    class Config:
        _attn_implementation = "sdpa"

    class Module:
        config = Config()

    q, k = torch.zeros(1, 4, 16, 8), torch.zeros(1, 2, 16, 8)
    monkeypatch.setattr(lf_attention, "ATTENTION_SPLIT_TOKENS", 16)
    assert lf_attention._split_by_kv_head(Module(), q, k, None)
    assert not lf_attention._split_by_kv_head(Module(), q, k, torch.ones(1, 1, 16, 16, dtype=torch.bool))
    assert not lf_attention._split_by_kv_head(Module(), q[:, :, :15], k[:, :, :15], None)
    assert not lf_attention._split_by_kv_head(Module(), q, k[:, :1], None)  # one kv head: nothing to split
    Module.config._attn_implementation = "eager"
    assert not lf_attention._split_by_kv_head(Module(), q, k, None)
