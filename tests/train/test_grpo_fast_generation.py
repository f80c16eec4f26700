"""loraforge's GRPOTrainer with rollouts through fast_generate: the same greedy completions as TRL's own
`model.generate` path, training steps with sampled rollouts, the flag, and what falls back."""

import pytest
import torch

from loraforge import testing
from loraforge.generation import decode

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")
grpo = pytest.importorskip("loraforge.train.grpo")
from tests.train.test_grpo import peft_model, prompts_dataset, zero_reward  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see tests/conftest.py


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_fast_models")
    return {arch: testing.save_tiny_model(root / arch, arch=arch, seed=5) for arch in ("llama", "gemma2")}


def make_trainer(cls, model, tokenizer, tmp_path, reward_funcs=(zero_reward,), fast_generation=None, **config):
    config = {"per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 6,
              "report_to": [], "use_cpu": True, "bf16": False, "save_strategy": "no", "disable_tqdm": True,
              "logging_steps": 1, **config}  # fmt: skip
    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), **config)
    extra = {"fast_generation": fast_generation} if cls is grpo.GRPOTrainer else {}
    trainer = cls(model=model, reward_funcs=list(reward_funcs), args=args, train_dataset=prompts_dataset(),
                  processing_class=tokenizer, **extra)  # fmt: skip
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def chat_prompt_ids(tokenizer, questions):
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
           for q in questions]  # fmt: skip
    return [i if isinstance(i, list) else i["input_ids"] for i in ids]


def counted(fn):
    before = dict(decode.STATS)
    result = fn()
    return result, {k: decode.STATS[k] - before[k] for k in before}


@pytest.mark.parametrize("arch,load_in_4bit", [("llama", True), ("gemma2", False)])
def test_greedy_rollouts_equal_trls(model_dirs, tmp_path, arch, load_in_4bit):
    """TRL's _generate_single_turn on the same prompts (different lengths, left-padded by TRL, each twice):
    the same completion ids, EOS cut included, with the decoding done by fast_generate."""
    questions = ["Hi.", "Hi.", "Tell me a long story about rain.", "Tell me a long story about rain."]
    completions = []
    for cls, extra in ((grpo.GRPOTrainer, {"fast_generation": True}), (trl.GRPOTrainer, {})):
        model, tokenizer = peft_model(model_dirs[arch], load_in_4bit, lora_b_seed=1)
        trainer = make_trainer(cls, model, tokenizer, tmp_path, max_completion_length=14,
                               generation_kwargs={"do_sample": False}, **extra)  # fmt: skip
        prompts = chat_prompt_ids(tokenizer, questions)
        (ids, _), stats = counted(lambda: trainer._generate_single_turn(prompts, None, {}, 2))
        assert "generate" not in model.__dict__  # the route is removed afterwards
        assert (stats["eager_steps"] > 0) == (cls is grpo.GRPOTrainer)
        completions.append(ids)
    assert completions[0] == completions[1]
    assert len({len(c) for c in completions[0]}) > 1 or any(len(c) == 14 for c in completions[0])


def test_training_steps_with_fast_rollouts(model_dirs, tmp_path):
    """Sampled rollouts (temperature, top-p) of 4 generations per prompt, 4-bit LoRA, KL to the reference:
    the loss is finite, the adapters move, and every rollout went through the static-cache loop."""
    from loraforge import rewards

    model, tokenizer = peft_model(model_dirs["llama"], True)
    trainer = make_trainer(grpo.GRPOTrainer, model, tokenizer, tmp_path, fast_generation=True, beta=0.04,
                           max_steps=2, max_completion_length=8, num_generations=4, learning_rate=1e-2,
                           temperature=0.9, top_p=0.95,
                           reward_funcs=[rewards.format_reward(r" ", mode="match"),
                                         rewards.length_reward(8, unit="tokens")])  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _, stats = counted(trainer.train)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    assert stats["eager_steps"] >= 2 * 7  # two rollouts of up to 8 tokens (prefill + 7 steps unless all ended)
    assert "generate" not in model.__dict__ and not decode._SESSIONS  # nothing kept between rollouts


def test_the_flag_and_fallbacks(model_dirs, tmp_path):
    model, tokenizer = peft_model(model_dirs["llama"], True)
    with pytest.raises(ValueError, match="fast_generation"):
        make_trainer(grpo.GRPOTrainer, model, tokenizer, tmp_path, fast_generation="yes")
    prompts = chat_prompt_ids(tokenizer, ["Hi.", "Hi."])
    # Default (None) on a CPU run: TRL's generate.
    trainer = make_trainer(grpo.GRPOTrainer, model, tokenizer, tmp_path, num_generations=2,
                           per_device_train_batch_size=2)  # fmt: skip
    _, stats = counted(lambda: trainer._generate_single_turn(prompts, None, {}, 2))
    assert stats["eager_steps"] == 0
    # A setting the loop does not implement: model.generate, with a warning, and TRL's results.
    trainer = make_trainer(grpo.GRPOTrainer, model, tokenizer, tmp_path, num_generations=2, fast_generation=True,
                           per_device_train_batch_size=2, repetition_penalty=1.3,
                           generation_kwargs={"do_sample": False})  # fmt: skip
    with pytest.warns(UserWarning, match="repetition_penalty"):
        (ids, _), stats = counted(lambda: trainer._generate_single_turn(prompts, None, {}, 2))
    assert stats["eager_steps"] == 0 and len(ids) == 2 and ids[0] == ids[1]


@pytest.mark.gpu
def test_grpo_on_cuda_rollouts_replay_a_cuda_graph(tmp_path):
    """bf16 QLoRA on CUDA with the default flag: each rollout captures its decode step once and replays it."""
    path = testing.save_tiny_model(tmp_path / "llama", arch="llama", seed=5, hidden_size=256, intermediate_size=512)
    from loraforge import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(path, dtype=torch.bfloat16)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=8,
                          max_completion_length=40, generation_kwargs={"min_new_tokens": 40}, max_steps=2,
                          learning_rate=1e-3, bf16=True, report_to=[], save_strategy="no", disable_tqdm=True,
                          logging_steps=1, gradient_checkpointing=True)  # fmt: skip
    trainer = grpo.GRPOTrainer(model=model, reward_funcs=[zero_reward], args=args, train_dataset=prompts_dataset(),
                               processing_class=tokenizer)  # fmt: skip
    _, stats = counted(trainer.train)
    assert stats["captures"] == 2 and stats["capture_failures"] == 0
    assert stats["replays"] == 2 * (39 - decode.WARMUP_STEPS)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert logs[-1]["completions/mean_length"] == 40
