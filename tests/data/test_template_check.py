"""The chat-template checks loraforge's trainers run as training starts: a template of another model
family, an end-of-turn token that generation does not stop on, and silence where template and model fit."""

import re
import warnings

import pytest
from loraforge import testing
from loraforge.data import build_jinja, chat_template_problems, get_chat_template
from loraforge.data.template_check import warn_on_chat_template_problems


def model_and_tokenizer(arch, template=None, map_eos_token=True, generation_eos=None):
    model = testing.tiny_model(arch)
    tokenizer = testing.build_tokenizer()
    if template is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tokens the tiny vocabulary lacks are added, with a warning
            tokenizer = get_chat_template(tokenizer, template, map_eos_token=map_eos_token)
    if generation_eos is not None:
        model.generation_config.eos_token_id = generation_eos
    return model, tokenizer


@pytest.mark.parametrize(
    "arch, template",
    [("qwen2", "llama-3.1"), ("qwen3", "gemma"), ("llama", "qwen-2.5"), ("gemma2", "llama-3"), ("mistral", "phi-3"),
     ("gemma", "mistral")],
)  # fmt: skip
def test_template_of_another_family_is_reported(arch, template):
    model, tokenizer = model_and_tokenizer(arch, template)
    (problem,) = chat_template_problems(model, tokenizer)  # eos was mapped: only the family is wrong
    assert f"model_type={arch!r}" in problem and "template is" in problem


@pytest.mark.parametrize(
    "arch, template",
    [("qwen2", "qwen-2.5"), ("qwen3", "qwen-3"), ("qwen2", "qwen-3"), ("llama", "llama-3.1"), ("gemma2", "gemma"),
     ("mistral", "mistral"), ("llama", "mistral"),  # Llama 2 chat models use the [INST] format
     ("qwen2", "chatml"), ("gemma", "chatml"), ("llama", "zephyr"), ("mistral", "alpaca"), ("qwen3", "vicuna")],
)  # fmt: skip
def test_matching_or_generic_templates_are_quiet(arch, template):
    model, tokenizer = model_and_tokenizer(arch, template)
    assert chat_template_problems(model, tokenizer) == []


def test_unknown_model_type_or_template_is_quiet():
    model, tokenizer = model_and_tokenizer("qwen2", "llama-3.1")
    model.config.model_type = "some_new_arch"
    assert chat_template_problems(model, tokenizer) == []
    model, tokenizer = model_and_tokenizer("qwen2")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    assert chat_template_problems(model, tokenizer) == []
    tokenizer.chat_template = None
    assert chat_template_problems(model, tokenizer) == []


def test_foreign_template_is_recognised_by_its_markers():
    """A template we did not write (no loraforge tag): detected by rendering it, then judged the same."""
    model, tokenizer = model_and_tokenizer("llama")
    tokenizer.chat_template = re.sub(r"\{#-? loraforge chat template: [\w.-]+ #\}", "", build_jinja("gemma"))
    assert "loraforge" not in tokenizer.chat_template
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    problems = chat_template_problems(model, tokenizer)
    assert any("'gemma'" in p and "model_type='llama'" in p for p in problems)


def test_end_of_turn_that_does_not_stop_generation_is_reported():
    # ChatML ends replies with <|im_end|>; the tokenizer keeps its own eos and the model stops on eos only.
    model, tokenizer = model_and_tokenizer("llama", "chatml", map_eos_token=False, generation_eos=testing.EOS_ID)
    assert tokenizer.eos_token_id == testing.EOS_ID
    (problem,) = chat_template_problems(model, tokenizer)
    assert "'<|im_end|>'" in problem and f"id {testing.IM_END_ID}" in problem and "would not stop" in problem

    # Either place that generation reads its stop ids from is enough.
    model.generation_config.eos_token_id = [testing.EOS_ID, testing.IM_END_ID]
    assert chat_template_problems(model, tokenizer) == []
    model, tokenizer = model_and_tokenizer("llama", "chatml", map_eos_token=True, generation_eos=testing.EOS_ID)
    assert tokenizer.eos_token_id == testing.IM_END_ID and chat_template_problems(model, tokenizer) == []
    # Templates whose turns end with the tokenizer's own eos always stop.
    model, tokenizer = model_and_tokenizer("mistral", "mistral", generation_eos=testing.EOS_ID)
    assert chat_template_problems(model, tokenizer) == []


def test_both_problems_at_once_become_two_warnings():
    model, tokenizer = model_and_tokenizer("qwen2", "llama-3.1", map_eos_token=False, generation_eos=testing.EOS_ID)
    with pytest.warns(UserWarning) as caught:
        problems = warn_on_chat_template_problems(model, tokenizer)
    assert len(problems) == 2
    messages = [str(w.message) for w in caught if str(w.message).startswith("chat template:")]
    assert len(messages) == 2 and "'<|eot_id|>'" in messages[1] and "model_type='qwen2'" in messages[0]


# ---------------------------------------------------------------------------------------------
# As training starts.


def _template_warnings(record):
    return [str(w.message) for w in record if str(w.message).startswith("chat template:")]


@pytest.mark.parametrize("template, expected", [("llama-3.1", 1), ("qwen-2.5", 0)])
def test_sft_trainer_warns_when_training_starts(tmp_path, monkeypatch, template, expected):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from loraforge.train import sft

    monkeypatch.setattr(trl.SFTTrainer, "train", lambda self, *args, **kwargs: "trained")  # the check, not training
    model, tokenizer = model_and_tokenizer("qwen2", template)
    args = trl.SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", max_steps=1)
    trainer = sft._trainer_class()(model=model, processing_class=tokenizer, args=args,
                                   train_dataset=datasets.Dataset.from_dict({"input_ids": [[7, 8, 9]]}))  # fmt: skip
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert trainer.train() == "trained"
    found = _template_warnings(record)
    assert len(found) == expected
    if expected:
        assert "'llama-3.1'" in found[0] and "model_type='qwen2'" in found[0]


@pytest.mark.parametrize("generation_eos, expected", [(testing.EOS_ID, 1), ([testing.EOS_ID, testing.IM_END_ID], 0)])
def test_grpo_trainer_warns_when_training_starts(tmp_path, monkeypatch, generation_eos, expected):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from loraforge.train import grpo

    monkeypatch.setattr(trl.GRPOTrainer, "train", lambda self, *args, **kwargs: "trained")
    model, tokenizer = model_and_tokenizer("llama", "chatml", map_eos_token=False, generation_eos=generation_eos)
    args = trl.GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                          per_device_train_batch_size=2, num_generations=2, max_steps=1)  # fmt: skip
    trainer = grpo.GRPOTrainer(model=model, processing_class=tokenizer, args=args,
                               reward_funcs=[lambda prompts, completions, **kw: [0.0] * len(completions)],
                               train_dataset=datasets.Dataset.from_dict({"prompt": ["Hi.", "Bye."]}))  # fmt: skip
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert trainer.train() == "trained"
    found = _template_warnings(record)
    assert len(found) == expected
    if expected:
        assert "'<|im_end|>'" in found[0]
