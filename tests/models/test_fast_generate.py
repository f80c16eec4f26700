"""fast_generate against model.generate on tiny models with LoRA adapters (B != 0), 4-bit and 16-bit: the
same greedy tokens for left-padded batches of different prompt lengths, EOS stopping mid-batch,
max_new_tokens 1, min_new_tokens; sampling filters equal to transformers' warpers; what the loop does not
implement goes to model.generate. On CUDA (`gpu`): the CUDA-graph replay against eager steps and
model.generate, graph reuse across calls and re-capture after the adapters change."""

import warnings

import pytest
import torch

from loraforge import testing
from loraforge.generation import decode, fast_generate, release
from loraforge.generation.sampling import filter_logits
from loraforge.generation.settings import DecodeSettings
from loraforge.models import FastLanguageModel

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

PROMPTS = ("Hi.", "Tell me a long story about rain and the sea.", "Bread", "Trains run on time when the")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see tests/conftest.py


def lora_model(path, load_in_4bit=True, dtype=torch.float32, seed=1, **kwargs):
    model, tokenizer = FastLanguageModel.from_pretrained(path, dtype=dtype, load_in_4bit=load_in_4bit, **kwargs)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=seed, init_lora_weights=False)
    tokenizer.padding_side = "left"
    return model, tokenizer


def left_padded(tokenizer, device="cpu", prompts=PROMPTS):
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True)
    assert (batch["attention_mask"][:, 0] == 0).any()  # some rows are padded
    return {k: v.to(device) for k, v in batch.items()}


def reference(model, batch, **kwargs):
    with torch.no_grad():
        return model.generate(**batch, **kwargs)


@pytest.mark.parametrize("arch", testing.ARCHITECTURES)
@pytest.mark.parametrize("load_in_4bit", (True, False))
def test_greedy_tokens_equal_generate(saved_models, arch, load_in_4bit):
    model, tokenizer = lora_model(saved_models[arch], load_in_4bit)
    batch = left_padded(tokenizer)
    expected = reference(model, batch, max_new_tokens=16, do_sample=False)
    before = dict(decode.STATS)
    assert torch.equal(fast_generate(model, **batch, max_new_tokens=16, do_sample=False), expected)
    assert decode.STATS["eager_steps"] - before["eager_steps"] == 15  # prefill + 15 decode steps, no fallback
    with model.disable_adapter():  # the adapters were in the tokens: without them they differ
        assert not torch.equal(fast_generate(model, **batch, max_new_tokens=16, do_sample=False), expected)
    release(model)


def test_eos_stops_rows_mid_batch_and_ends_the_run(saved_models):
    model, tokenizer = lora_model(saved_models["llama"])
    batch = left_padded(tokenizer)
    prompt = batch["input_ids"].shape[1]
    free = reference(model, batch, max_new_tokens=24, do_sample=False, eos_token_id=None)[:, prompt:]
    # EOS ids that each row reaches by a different step, all well before 24 tokens.
    eos = sorted({int(free[row, step]) for row, step in ((0, 2), (1, 5), (2, 9), (3, 13))})
    expected = reference(model, batch, max_new_tokens=24, do_sample=False, eos_token_id=eos)
    ended = torch.isin(expected[:, prompt:], torch.tensor(eos))
    ends = ended.int().argmax(dim=1)
    assert ended.any(dim=1).all() and expected.shape[1] == prompt + int(ends.max()) + 1 < prompt + 24
    assert len(set(ends.tolist())) > 1
    for check_every in (1, 4, 16):
        got = fast_generate(model, **batch, max_new_tokens=24, do_sample=False, eos_token_id=eos,
                            check_every=check_every)  # fmt: skip
        assert torch.equal(got, expected), check_every
    # Finished rows hold the pad token after their EOS.
    for row, end in enumerate(ends.tolist()):
        assert (got[row, prompt + end + 1 :] == tokenizer.pad_token_id).all()
    # min_new_tokens: EOS masked for the first tokens, as model.generate does.
    expected = reference(model, batch, max_new_tokens=24, do_sample=False, eos_token_id=eos, min_new_tokens=7)
    assert torch.equal(fast_generate(model, **batch, max_new_tokens=24, do_sample=False, eos_token_id=eos,
                                     min_new_tokens=7), expected)  # fmt: skip


def test_max_new_tokens_one_and_inferred_mask_and_generation_config(saved_models):
    from transformers import GenerationConfig

    model, tokenizer = lora_model(saved_models["qwen3"])
    batch = left_padded(tokenizer)
    expected = reference(model, batch, max_new_tokens=1, do_sample=False)
    assert expected.shape[1] == batch["input_ids"].shape[1] + 1
    assert torch.equal(fast_generate(model, **batch, max_new_tokens=1, do_sample=False), expected)
    # No attention mask: inferred from the pad token (not an EOS token here), as transformers infers it for
    # a model whose forward names `attention_mask` (loraforge's patched *ForCausalLM.forward hides it from
    # generate's signature check, so there model.generate needs the mask passed).
    config = GenerationConfig(max_new_tokens=9, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    padding = batch["input_ids"].ne(tokenizer.pad_token_id)
    expected = reference(model, {"input_ids": batch["input_ids"], "attention_mask": padding},
                         generation_config=config)  # fmt: skip
    assert torch.equal(fast_generate(model, batch["input_ids"], generation_config=config), expected)
    # A plain (not PEFT) model, and the default length from the model's generation config (max_length 20).
    plain, _ = FastLanguageModel.from_pretrained(saved_models["qwen3"], dtype=torch.float32)
    one = {"input_ids": batch["input_ids"][1:2]}
    assert torch.equal(fast_generate(plain, **one), reference(plain, one))


def test_sampling(saved_models):
    model, tokenizer = lora_model(saved_models["gemma2"])
    batch = left_padded(tokenizer)
    greedy = fast_generate(model, **batch, max_new_tokens=12, do_sample=False, eos_token_id=None)
    torch.manual_seed(0)
    assert torch.equal(fast_generate(model, **batch, max_new_tokens=12, do_sample=True, top_k=1, eos_token_id=None),
                       greedy)  # fmt: skip
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(fast_generate(model, **batch, max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0,
                                  eos_token_id=None))  # fmt: skip
    assert torch.equal(runs[0], runs[1])  # seeded
    assert not torch.equal(runs[0], greedy)
    new = runs[0][:, batch["input_ids"].shape[1] :]
    assert new.shape == (4, 12) and ((new >= 0) & (new < len(tokenizer))).all()
    torch.manual_seed(6)
    filtered = fast_generate(model, **batch, max_new_tokens=12, do_sample=True, temperature=0.7, top_p=0.8, min_p=0.1)
    assert ((filtered >= 0) & (filtered < len(tokenizer))).all()


@pytest.mark.parametrize("case", [{"temperature": 0.7}, {"top_k": 5}, {"top_p": 0.6}, {"min_p": 0.3},
                                  {"temperature": 1.3, "top_k": 20, "top_p": 0.9, "min_p": 0.05}])  # fmt: skip
def test_filters_equal_transformers_warpers(case):
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    settings = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": None, **case}
    warpers = []
    if settings["temperature"] != 1.0:
        warpers.append(TemperatureLogitsWarper(settings["temperature"]))
    if settings["top_k"]:
        warpers.append(TopKLogitsWarper(settings["top_k"]))
    if settings["top_p"] < 1.0:
        warpers.append(TopPLogitsWarper(settings["top_p"]))
    if settings["min_p"] is not None:
        warpers.append(MinPLogitsWarper(settings["min_p"]))
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(len(str(case)))) * 3
    logits[0, :5] = logits[0, 0]  # ties
    expected = logits
    for warper in warpers:
        expected = warper(None, expected)
    ours = filter_logits(logits, DecodeSettings(8, True, eos_token_ids=(), pad_token_id=0, eos_blocked_steps=0,
                                                **settings))  # fmt: skip
    assert torch.equal(ours, expected)


def test_what_the_loop_does_not_implement_goes_to_generate(saved_models):
    model, tokenizer = lora_model(saved_models["mistral"])
    batch = left_padded(tokenizer)
    cases = [{"repetition_penalty": 1.3}, {"num_beams": 2}, {"num_return_sequences": 2, "do_sample": True},
             {"output_scores": True}, {"no_repeat_ngram_size": 2}]  # fmt: skip
    for case in cases:
        torch.manual_seed(0)
        expected = reference(model, batch, max_new_tokens=6, **case)
        torch.manual_seed(0)
        with pytest.warns(UserWarning, match="using model.generate"):
            got = fast_generate(model, **batch, max_new_tokens=6, **case)
        assert torch.equal(got, expected), case
    # A sliding window (64 tokens in the tiny Mistral) shorter than prompt + new tokens.
    with pytest.warns(UserWarning, match="sliding window"):
        got = fast_generate(model, **batch, max_new_tokens=60, do_sample=False)
    assert torch.equal(got, reference(model, batch, max_new_tokens=60, do_sample=False))
    # Within the window the loop runs.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = fast_generate(model, **batch, max_new_tokens=20, do_sample=False)
    assert torch.equal(got, reference(model, batch, max_new_tokens=20, do_sample=False))


def test_training_mode_with_gradient_checkpointing(saved_models):
    """As TRL calls it: training mode, checkpointing on; the loop keeps its cache, and the flags come back."""
    model, tokenizer = lora_model(saved_models["llama"])
    model.train()
    assert model.is_gradient_checkpointing
    batch = left_padded(tokenizer)
    got = fast_generate(model, **batch, max_new_tokens=10, do_sample=False)
    assert model.is_gradient_checkpointing and model.training
    model.eval()
    assert torch.equal(got, reference(model, batch, max_new_tokens=10, do_sample=False))


def test_the_kept_session_is_reused_until_the_model_changes(saved_models):
    model, tokenizer = lora_model(saved_models["qwen2"])
    batch = left_padded(tokenizer)
    causal_lm = model.get_base_model()
    first = fast_generate(model, **batch, max_new_tokens=10, do_sample=False)
    session = decode._SESSIONS[causal_lm]
    # Another prompt length within the same rounded cache length: the same session.
    shorter = left_padded(tokenizer, prompts=PROMPTS[1:] + ("Cats",))
    assert torch.equal(fast_generate(model, **shorter, max_new_tokens=10, do_sample=False),
                       reference(model, shorter, max_new_tokens=10, do_sample=False))  # fmt: skip
    assert decode._SESSIONS[causal_lm] is session
    assert torch.equal(fast_generate(model, **batch, max_new_tokens=10, do_sample=False), first)
    # An adapter changed in place (its version counter moves): a new session, the new adapter's tokens.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(-3.0)
    changed = fast_generate(model, **batch, max_new_tokens=10, do_sample=False)
    assert decode._SESSIONS[causal_lm] is not session
    assert torch.equal(changed, reference(model, batch, max_new_tokens=10, do_sample=False))
    assert not torch.equal(changed, first)
    fast_generate(model, **batch, max_new_tokens=10, do_sample=False, reuse_graph=False)
    assert causal_lm not in decode._SESSIONS
    # What a captured step reads from caches outside the model (here each NF4 layer's stacked adapters, A
    # and block-diagonal B, of Q/K/V, of gate/up, and of the output and down projections, stacks of one)
    # is found, so that a kept graph can hold it.
    assert len(decode.cached_tensors(causal_lm)) == 2 * 4 * causal_lm.config.num_hidden_layers


# Operations that read a tensor's value on the host or build a tensor from Python data (a host-to-device
# copy on CUDA): a CUDA graph capture fails on them (or bakes in a value), so a decode step must have none.
_HOST_READS = {"aten::_local_scalar_dense", "aten::lift_fresh", "aten::nonzero", "aten::masked_select",
               "aten::unique", "aten::_unique2", "aten::unique_consecutive", "aten::repeat_interleave"}  # fmt: skip


@pytest.mark.parametrize("arch", testing.ARCHITECTURES)
def test_the_decode_step_reads_nothing_on_the_host(saved_models, arch, monkeypatch):
    """Checked on CPU, where CI runs: every op of a decode step (transformers' layers, PEFT, our fused
    forwards and NF4 weights, sampling with every filter, min_new_tokens, EOS) as the dispatcher sees it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class HostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name in _HOST_READS:
                seen.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    step = decode.DecodeSession._step

    def watched(self):
        with HostReads():
            step(self)

    monkeypatch.setattr(decode.DecodeSession, "_step", watched)
    model, tokenizer = lora_model(saved_models[arch])
    before = decode.STATS["eager_steps"]
    fast_generate(model, **left_padded(tokenizer), max_new_tokens=5, do_sample=True, temperature=0.7, top_k=20,
                  top_p=0.9, min_p=0.05, min_new_tokens=2, reuse_graph=False)  # fmt: skip
    assert decode.STATS["eager_steps"] - before == 4 and seen == []


# ---------------------------------------------------------------------------------------------
# CUDA graphs.


@pytest.mark.gpu
@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("llama", "eager"), ("gemma2", "eager"), ("qwen3", "sdpa")])
def test_graph_replay_equals_eager_and_generate_on_cuda(tmp_path, arch, attn):
    path = testing.save_tiny_model(tmp_path / arch, arch=arch, seed=3, hidden_size=256, intermediate_size=512)
    model, tokenizer = lora_model(path, dtype=torch.float32, attn_implementation=attn)
    assert model.get_base_model().config._attn_implementation == attn
    batch = left_padded(tokenizer, "cuda")
    expected = reference(model, batch, max_new_tokens=40, do_sample=False, eos_token_id=None)
    eager = fast_generate(model, **batch, max_new_tokens=40, do_sample=False, eos_token_id=None, use_cuda_graph=False)
    before = dict(decode.STATS)
    graphed = fast_generate(model, **batch, max_new_tokens=40, do_sample=False, eos_token_id=None)
    delta = {k: decode.STATS[k] - before[k] for k in before}
    assert delta["captures"] == 1 and delta["capture_failures"] == 0 and delta["replays"] == 39 - decode.WARMUP_STEPS
    assert torch.equal(graphed, eager) and torch.equal(graphed, expected)
    # A second call reuses the graph.
    again = fast_generate(model, **batch, max_new_tokens=40, do_sample=False, eos_token_id=None)
    assert torch.equal(again, expected)
    assert decode.STATS["captures"] - before["captures"] == 1
    assert decode.STATS["replays"] - before["replays"] == 2 * 39 - decode.WARMUP_STEPS
    # An optimizer step on the adapters: captured again, and the new adapters' tokens.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1.0)
    for p in params:
        p.grad = torch.randn_like(p) * 0.05
    optimizer.step()
    after = fast_generate(model, **batch, max_new_tokens=40, do_sample=False, eos_token_id=None)
    assert decode.STATS["captures"] - before["captures"] == 2
    assert torch.equal(after, reference(model, batch, max_new_tokens=40, do_sample=False, eos_token_id=None))
    release(model)


@pytest.mark.gpu
def test_graph_sampling_and_eos_on_cuda_bf16(tmp_path):
    path = testing.save_tiny_model(tmp_path / "llama", arch="llama", seed=3, hidden_size=256, intermediate_size=512)
    model, tokenizer = lora_model(path, dtype=torch.bfloat16)
    batch = left_padded(tokenizer, "cuda")
    greedy = fast_generate(model, **batch, max_new_tokens=48, do_sample=False, eos_token_id=None)
    assert torch.equal(greedy, fast_generate(model, **batch, max_new_tokens=48, do_sample=False, eos_token_id=None,
                                             use_cuda_graph=False))  # fmt: skip
    # top_k=1 samples the greedy token only where the largest logit is unique: like transformers' warper it
    # keeps ties, and bf16 logits over 512 tokens tie often enough. An fp32 head (its input cast up) makes
    # ties vanishingly rare while the layers stay bf16.
    head = model.get_output_embeddings()
    head.float()
    cast_up = head.register_forward_pre_hook(lambda module, args: (args[0].float(),))
    greedy_fp32_head = fast_generate(model, **batch, max_new_tokens=48, do_sample=False, eos_token_id=None)
    torch.manual_seed(0)
    assert torch.equal(fast_generate(model, **batch, max_new_tokens=48, do_sample=True, top_k=1, eos_token_id=None),
                       greedy_fp32_head)  # fmt: skip
    cast_up.remove()
    head.to(torch.bfloat16)
    torch.manual_seed(1)
    sampled = fast_generate(model, **batch, max_new_tokens=48, do_sample=True, temperature=1.0, top_p=0.95,
                            eos_token_id=None)  # fmt: skip
    new = sampled[:, batch["input_ids"].shape[1] :]
    assert ((new >= 0) & (new < len(tokenizer))).all() and not torch.equal(sampled, greedy)
    # Steps replayed past a new draw each time (the graph's RNG offset advances): not one token repeated.
    assert len(set(new[0].tolist())) > 4
    # EOS mid-run with the graph: the same cut as eager.
    prompt = batch["input_ids"].shape[1]
    eos = int(greedy[2, prompt + 20])
    kwargs = {"max_new_tokens": 48, "do_sample": False, "eos_token_id": eos}
    assert torch.equal(fast_generate(model, **batch, **kwargs), fast_generate(model, **batch, **kwargs,
                                                                               use_cuda_graph=False))  # fmt: skip
    release(model)
