"""The usual notebook, end to end on a tiny model: load, get_peft_model, chat template, SFTTrainer,
train_on_responses_only, train, for_inference, generate, save; the adapter loads in plain PEFT."""

import pytest
import torch

from loraforge import FastLanguageModel, get_chat_template, testing, train_on_responses_only

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def test_sft_notebook_flow(tmp_path, seed):
    path = testing.save_tiny_model(tmp_path / "base", arch="qwen3", seed=seed % 100)
    model, tokenizer = FastLanguageModel.from_pretrained(path, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing="unsloth")
    tokenizer = get_chat_template(tokenizer, "chatml")
    conversations = [
        [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": f"It is {a + b}."}]
        for a in range(5) for b in range(5)
    ]  # fmt: skip
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    dataset = datasets.Dataset.from_dict({"text": texts})
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=4,
                         learning_rate=1e-2, logging_steps=1, report_to=[], dataset_text_field="text",
                         max_length=96, use_cpu=True, save_strategy="no", seed=seed % 1000)  # fmt: skip
    trainer = trl.SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=args)
    trainer = train_on_responses_only(trainer)
    labels = trainer.train_dataset[0]["labels"]
    kept = tokenizer.decode([t for t in labels if t != -100])
    assert kept.startswith("It is") and "user" not in kept
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3

    FastLanguageModel.for_inference(model)
    prompt = tokenizer.apply_chat_template([conversations[0][0]], add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)  # fmt: skip
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]

    model.save_pretrained(tmp_path / "adapter")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path / "adapter")
    ours = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    theirs = {n.replace(".default", ""): p for n, p in plain.named_parameters() if "lora_" in n}
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name].detach(), theirs[name].detach())
