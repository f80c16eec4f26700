"""GRPO with loraforge models through TRL: our GRPOTrainer against TRL's own on the same batch (loss and
LoRA gradients, every loss type, with and without KL, clipping, importance weights), the reference
policy without a second copy of the weights, rollouts with the KV cache and adapters attached, short
training runs for every loss type, and a task the tiny model learns."""

import pytest
import torch

from loraforge import FastLanguageModel, rewards, testing
from loraforge.train.chunked_logprobs import reference_token_logprobs

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
grpo = pytest.importorskip("loraforge.train.grpo")
from trl.trainer.utils import use_adapter  # noqa: E402

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see tests/conftest.py


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_models")
    # initializer_range 0.3 gives the tiny model a head whose logits can move: at transformers'
    # default 0.02 the (frozen, tied) head caps any LoRA change of a logit near +-1 on this size.
    return {arch: testing.save_tiny_model(root / arch, arch=arch, seed=5, **kw)
            for arch, kw in [("llama", {}), ("gemma2", {}), ("qwen3", {"initializer_range": 0.3})]}  # fmt: skip


def peft_model(path, load_in_4bit, lora_b_seed=None):
    model, tokenizer = FastLanguageModel.from_pretrained(path, dtype=torch.float32, load_in_4bit=load_in_4bit)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    if lora_b_seed is not None:  # a trained-looking adapter: the policy differs from the base model
        g = torch.Generator().manual_seed(lora_b_seed)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=g) * 0.05
    return model, tokenizer


def prompts_dataset(n=8):
    topics = ["cats", "rain", "bread", "trains"]
    return datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Tell me about {topics[i % 4]}."}]
                                                  for i in range(n)]})  # fmt: skip


def zero_reward(prompts, completions, **kwargs):
    return [0.0] * len(completions)


def make_trainer(cls, model, tokenizer, tmp_path, reward_funcs=(zero_reward,), **config):
    config = {"per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 6,
              "report_to": [], "use_cpu": True, "bf16": False, "save_strategy": "no", "disable_tqdm": True,
              "logging_steps": 1, **config}  # fmt: skip
    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), **config)
    extra = {"logprob_chunk_rows": 5} if cls is grpo.GRPOTrainer else {}  # several chunks per call
    trainer = cls(model=model, reward_funcs=list(reward_funcs), args=args, train_dataset=prompts_dataset(),
                  processing_class=tokenizer, **extra)  # fmt: skip
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); compute_loss reads it
    return trainer


def handmade_batch(vocab, generator):
    """Left-padded prompts, right-padded completions (one cut to a single token), as TRL builds them."""
    batch, prompt_len, completion_len = 4, 5, 6
    prompt_ids = torch.randint(6, vocab, (batch, prompt_len), generator=generator)
    prompt_mask = torch.ones(batch, prompt_len, dtype=torch.long)
    prompt_mask[0, :2] = 0
    prompt_ids[0, :2] = testing.PAD_ID
    completion_ids = torch.randint(6, vocab, (batch, completion_len), generator=generator)
    completion_mask = torch.ones(batch, completion_len, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[2, 1:] = 0
    completion_ids[completion_mask == 0] = testing.PAD_ID
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": torch.tensor([1.0, -0.5, 0.3, -0.8]),
            "num_items_in_batch": completion_mask.sum()}  # fmt: skip


def scores(trainer, inputs, adapter="policy"):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    keep = inputs["completion_ids"].shape[1]
    if adapter == "policy":
        return trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep, compute_entropy=True)[:2]
    with torch.no_grad(), use_adapter(trainer.model, adapter):
        return trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep)[0]


def loss_and_grads(trainer, inputs):
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


# ---------------------------------------------------------------------------------------------
# Same batch, same numbers as TRL.


@pytest.mark.parametrize("arch,load_in_4bit", [("llama", False), ("gemma2", True)])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_lora_grads_match_trl(model_dirs, tmp_path, arch, load_in_4bit, loss_type):
    """beta 0 and > 0, fresh (ratio 1) and stale old log-probs (importance weights, clipping with
    DAPO's asymmetric epsilon), sequence-level importance sampling: loss within 1e-5, grads allclose."""
    config = {"loss_type": loss_type, "beta": 0.04, "temperature": 0.7, "num_iterations": 2, "epsilon": 0.2,
              "epsilon_high": 0.28}  # fmt: skip
    pair = []
    for cls in (grpo.GRPOTrainer, trl.GRPOTrainer):
        model, tokenizer = peft_model(model_dirs[arch], load_in_4bit, lora_b_seed=1)
        trainer = make_trainer(cls, model, tokenizer, tmp_path, **config)
        # TRL makes QLoRA adapters bf16; fp32 here so that the comparison is about the scoring alone.
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        pair.append(trainer)
    ours, theirs = pair
    assert ours.ref_model is None and theirs.ref_model is None  # the reference comes from the same weights

    inputs = handmade_batch(len(tokenizer), torch.Generator().manual_seed(2))
    (ours_logps, ours_entropy), (their_logps, their_entropy) = scores(ours, inputs), scores(theirs, inputs)
    torch.testing.assert_close(ours_logps, their_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_entropy, their_entropy, rtol=1e-5, atol=1e-5)
    assert (ours_logps[inputs["completion_mask"] == 0] == 0).all()
    # TRL's reference for a pre-wrapped PEFT model is a frozen copy of its adapter ("ref"); for a new
    # adapter trained from scratch it is the base model (adapters disabled). Check both.
    for adapter in ("ref", None):
        torch.testing.assert_close(scores(ours, inputs, adapter), scores(theirs, inputs, adapter), rtol=1e-5, atol=1e-5)
    inputs["ref_per_token_logps"] = scores(theirs, inputs, None)

    noise = 0.4 * torch.randn(their_logps.shape, generator=torch.Generator().manual_seed(3))
    cases = [("beta>0, fresh", 0.04, "token", None), ("beta>0, stale", 0.04, "token", their_logps.detach() + noise),
             ("beta=0, stale", 0.0, "token", their_logps.detach() + noise),
             ("sequence IS", 0.04, "sequence", their_logps.detach() + noise)]  # fmt: skip
    for name, beta, level, old in cases:
        batch = {**inputs, **({"old_per_token_logps": old} if old is not None else {})}
        results = []
        for trainer in (ours, theirs):
            trainer.beta, trainer.importance_sampling_level = beta, level
            results.append(loss_and_grads(trainer, batch))
        (loss, grads), (their_loss, their_grads) = results
        assert abs(loss.item() - their_loss.item()) <= 1e-5 * max(1.0, abs(their_loss.item())), name
        assert grads.keys() == their_grads.keys() and all("lora_" in n for n in grads)
        for key in grads:
            scale = their_grads[key].abs().max().item()
            torch.testing.assert_close(grads[key], their_grads[key], rtol=1e-4, atol=1e-5 * max(scale, 1e-3),
                                       msg=lambda m, key=key, name=name: f"{name}: {key}: {m}")  # fmt: skip
        if old is not None and level == "token":
            assert ours._metrics["train"]["clip_ratio/region_mean"][-1] > 0, "the stale case should clip some tokens"


def test_full_finetuning_grads_match_trl(model_dirs, tmp_path):
    """Every weight trains, the tied embedding / lm_head included: its gradient comes through the
    chunked backward (dW) and the embedding lookup together, as in TRL."""
    pair = []
    for cls in (grpo.GRPOTrainer, trl.GRPOTrainer):
        model, tokenizer = FastLanguageModel.from_pretrained(model_dirs["qwen3"], dtype=torch.float32,
                                                             load_in_4bit=False, full_finetuning=True)  # fmt: skip
        pair.append(make_trainer(cls, model, tokenizer, tmp_path, loss_type="dapo", beta=0.0, temperature=0.8))
    assert pair[0].model.config.tie_word_embeddings
    inputs = handmade_batch(len(tokenizer), torch.Generator().manual_seed(7))
    stale = scores(pair[1], inputs)[0].detach()
    inputs["old_per_token_logps"] = stale + 0.3 * torch.randn(stale.shape, generator=torch.Generator().manual_seed(8))
    (loss, grads), (their_loss, their_grads) = (loss_and_grads(t, inputs) for t in pair)
    assert abs(loss.item() - their_loss.item()) <= 1e-5 * max(1.0, abs(their_loss.item()))
    assert grads.keys() == their_grads.keys() and any("embed_tokens" in n for n in grads)
    for key in grads:
        scale = their_grads[key].abs().max().item()
        torch.testing.assert_close(grads[key], their_grads[key], rtol=1e-4, atol=1e-5 * max(scale, 1e-3))


def test_reference_is_the_base_model_without_a_copy(model_dirs, tmp_path):
    """Adapters disabled give the base model's own log-probs (temperature, Gemma-2 softcap included),
    and training adds only LoRA tensors: no second copy of the base weights."""
    path = model_dirs["gemma2"]
    model, tokenizer = peft_model(path, load_in_4bit=False, lora_b_seed=4)
    base_tensors = sum(1 for n, _ in model.named_parameters() if "lora_" not in n)
    trainer = make_trainer(grpo.GRPOTrainer, model, tokenizer, tmp_path, beta=0.1, temperature=0.8)
    assert trainer.ref_model is None
    assert sum(1 for n, _ in model.named_parameters() if "lora_" not in n) == base_tensors

    inputs = handmade_batch(len(tokenizer), torch.Generator().manual_seed(5))
    ref = scores(trainer, inputs, adapter=None)
    policy, _ = scores(trainer, inputs)
    assert (ref - policy).abs().max() > 1e-3  # the adapter matters, so the check below means something

    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    keep = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        hidden = plain.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -keep - 1 : -1]
        expected, _ = reference_token_logprobs(hidden, plain.lm_head.weight, ids[:, -keep:], temperature=0.8,
                                               softcap=plain.config.final_logit_softcapping)  # fmt: skip
    expected = expected * inputs["completion_mask"]
    torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Rollouts.


def test_generation_uses_the_kv_cache_with_adapters_attached(model_dirs):
    """As TRL generates: training mode, gradient checkpointing on, under no_grad, prompts of different
    lengths left-padded, several samples per prompt. Greedy tokens equal a no-cache recomputation."""
    model, tokenizer = peft_model(model_dirs["llama"], load_in_4bit=True, lora_b_seed=6)
    model.train()
    # TRL's sampler repeats each prompt num_generations times (here 2) in one batch.
    questions = ("Hi.", "Hi.", "Tell me a long story about rain.", "Tell me a long story about rain.")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in questions]  # fmt: skip
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    lengths = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: lengths.append(args[0].shape))
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, eos_token_id=None)
    hook.remove()
    assert lengths[0][0] == 4 and all(shape == (4, 1) for shape in lengths[1:])  # prefill, then one token a step
    assert not any(getattr(m, "merged", False) for m in model.modules())

    # The same greedy continuation, recomputed from scratch every step without a cache.
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        for _ in range(6):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(out, ids)
    with torch.no_grad(), model.disable_adapter():
        base = model.generate(**batch, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert not torch.equal(base, out)  # the adapters were in the generation


# ---------------------------------------------------------------------------------------------
# Training.


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_training_steps_each_loss_type(model_dirs, tmp_path, monkeypatch, loss_type):
    """QLoRA, beta > 0, num_iterations 2 (old log-probs and importance weights): our scoring runs for
    policy, old policy and reference, and the rollouts are batched over prompts x generations with the
    KV cache."""
    model, tokenizer = peft_model(model_dirs["llama"], load_in_4bit=True)
    calls = []
    real = grpo.chunked_token_logprobs

    def spy(*args, **kwargs):
        # with grad: is use_gradient_checkpointing="unsloth"'s offloaded function still the one in use?
        calls.append(torch.is_grad_enabled() and grpo.uses_offloaded_checkpointing(model))
        return real(*args, **kwargs)

    monkeypatch.setattr(grpo, "chunked_token_logprobs", spy)
    trainer = make_trainer(grpo.GRPOTrainer, model, tokenizer, tmp_path, loss_type=loss_type, beta=0.04,
                           num_iterations=2, max_steps=2, max_completion_length=8, num_generations=4,
                           learning_rate=1e-2, reward_funcs=[rewards.format_reward(r" ", mode="match"),
                                                             rewards.length_reward(8, unit="tokens")])  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda m, args, out: shapes.append((tuple(args[0].shape), torch.is_grad_enabled()))
    )
    trainer.train()
    hook.remove()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert "kl" in logs[0] and "clip_ratio/region_mean" in logs[0]
    # num_iterations=2: one rollout batch scored for the old policy and the reference (no grad), then
    # the policy scored with grad at each of the two steps that reuse it, with offloaded checkpointing
    # although Trainer.train() and TRL's rollout reinstall plain checkpointing.
    assert calls == [False, False, True, True]
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    generation = [s for s, grad in shapes if not grad]
    assert (4, 1) in generation  # decoding one token at a time for the 4 rollouts: the cache is used


def test_tiny_model_learns_a_format(model_dirs, tmp_path):
    """Reward 1 when the reply starts with a space-led word (a quarter of the vocabulary at first):
    with 4-bit LoRA the mean reward rises well within eight steps."""
    model, tokenizer = FastLanguageModel.from_pretrained(model_dirs["qwen3"], dtype=torch.float32, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, random_state=0)
    starts_with_space = rewards.format_reward(r" ", mode="match")
    trainer = make_trainer(grpo.GRPOTrainer, model, tokenizer, tmp_path, reward_funcs=[starts_with_space],
                           loss_type="dapo", beta=0.0, max_steps=8, per_device_train_batch_size=16,
                           num_generations=8, max_completion_length=8, learning_rate=2e-2,
                           lr_scheduler_type="constant", seed=1)  # fmt: skip
    trainer.train()
    mean_rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert len(mean_rewards) == 8
    first, last = sum(mean_rewards[:3]) / 3, sum(mean_rewards[-3:]) / 3
    assert last > first + 0.2, mean_rewards


def test_patch_fast_rl_is_a_checked_no_op():
    from loraforge.train.patch_fast_rl import PatchFastRL

    assert PatchFastRL("GRPO", FastLanguageModel) is None
    assert PatchFastRL() is None
    with pytest.raises(ValueError, match="unknown algorithm"):
        PatchFastRL("PPO-ish", FastLanguageModel)
    with pytest.raises(TypeError):
        PatchFastRL("grpo", object())
