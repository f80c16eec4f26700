"""SFT batches through TRL's SFTTrainer with loraforge-patched models: a packed batch (packing=True) and a
padding-free batch (padding_free=True: one row, position_ids restarting per sequence, no attention mask)
give the loss and LoRA gradients of the same sequences run one at a time; gradient accumulation over
micro-batches with unequal numbers of trainable tokens takes the same optimizer step as one big batch."""

import itertools

import pytest
import torch
from loraforge import FastLanguageModel, testing
from loraforge.train import sft

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see tests/conftest.py


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_batching")
    return {arch: testing.save_tiny_model(root / arch, arch=arch, seed=7) for arch in ("llama", "qwen2", "gemma2")}


def lora_model(path, load_in_4bit, generator):
    """A patched PEFT model whose lora_B is random (so lora_A gets a gradient too)."""
    model, tokenizer = FastLanguageModel.from_pretrained(path, dtype=torch.float32, load_in_4bit=load_in_4bit)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0,
                                             use_gradient_checkpointing="unsloth")  # fmt: skip
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    return model, tokenizer


def lora_state(model, grads=False):
    return {n: (p.grad if grads else p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def fp32_adapters(model):
    # TRL makes the adapters of a quantized model bf16; fp32 here so the comparison can be tight.
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def separate_loss_and_grads(model, sequences):
    """The reference: each sequence alone (no padding, no packing), summed token losses / all tokens."""
    model.train()
    model.zero_grad(set_to_none=True)
    total = sum(len(s) - 1 for s in sequences)
    loss = 0.0
    for sequence in sequences:
        ids = torch.tensor([sequence])
        part = model(input_ids=ids, labels=ids, num_items_in_batch=total).loss
        part.backward()
        loss += part.item()
    return loss, lora_state(model, grads=True)


def assert_grads_close(grads, expected):
    assert grads.keys() == expected.keys() and all("lora_" in n for n in grads)
    assert any("lora_A" in n and expected[n].abs().max() > 0 for n in expected)
    for name in grads:
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=2e-6 * max(scale, 1e-3),
                                   msg=lambda m, name=name: f"{name}: {m}")  # fmt: skip


def split_rows(batch):
    """The sequences a padding-free batch holds: each row cut where position_ids restart at 0."""
    found = []
    for ids, positions in zip(batch["input_ids"], batch["position_ids"]):
        starts = [i for i, p in enumerate(positions.tolist()) if p == 0] + [len(positions)]
        found += [ids[a:b].tolist() for a, b in itertools.pairwise(starts)]
    return found


@pytest.mark.parametrize("mode", ["packing", "padding_free"])
@pytest.mark.parametrize("arch,load_in_4bit,trainer_kind", [("llama", True, "loraforge"), ("gemma2", False, "loraforge"),
                                                            ("qwen2", False, "trl")])  # fmt: skip
def test_packed_and_padding_free_batches_match_separate_sequences(model_dirs, tmp_path, seed, mode, arch, load_in_4bit,
                                                                   trainer_kind):  # fmt: skip
    """Gemma 2: one sequence is longer than the sliding window (64), so the window meets the packing mask.
    "loraforge" is the CLI's trainer (loss from our fused cross-entropy); "trl" is TRL's own SFTTrainer as a
    notebook uses it (TRL's fused lm_head on our patched backbone)."""
    generator = torch.Generator().manual_seed(seed)
    model, tokenizer = lora_model(model_dirs[arch], load_in_4bit, generator)
    lengths = [int(n) for n in torch.randint(12, 40, (5,), generator=generator)] + [int(torch.randint(70, 100, (1,),
                                                                                                     generator=generator))]  # fmt: skip
    sequences = [torch.randint(6, len(tokenizer), (n,), generator=generator).tolist() for n in lengths]
    options = {"packing": True, "max_length": 128} if mode == "packing" else {"padding_free": True, "max_length": None}
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=len(sequences), report_to=[],
                         use_cpu=True, save_strategy="no", seed=seed % 1000, **options)  # fmt: skip
    cls = sft._trainer_class() if trainer_kind == "loraforge" else trl.SFTTrainer
    trainer = cls(model=model, processing_class=tokenizer, train_dataset=datasets.Dataset.from_dict(
        {"input_ids": sequences}), args=args)  # fmt: skip
    fp32_adapters(model)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and "position_ids" in batch
    assert sorted(split_rows(batch)) == sorted(sequences)  # every sequence whole, in one batch
    assert batch["input_ids"].shape == (1, sum(lengths))  # one row, no padding
    if mode == "packing":
        assert len(trainer.train_dataset) >= 2  # several 128-token packs, which the collator puts in one row

    expected_loss, expected_grads = separate_loss_and_grads(model, sequences)
    model.zero_grad(set_to_none=True)
    total = torch.tensor(sum(n - 1 for n in lengths))
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=total)
    loss.backward()
    assert abs(loss.item() - expected_loss) <= 1e-5 * max(1.0, expected_loss)
    assert_grads_close(lora_state(model, grads=True), expected_grads)

    # The check can fail: the same row read as one sequence (tokens attending across the boundaries)
    # gives gradients that are off by far more than the tolerance (in practice by more than 100%).
    unpacked = {**batch, "position_ids": torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])}
    model.zero_grad(set_to_none=True)
    trainer.compute_loss(model, unpacked, num_items_in_batch=total).backward()
    crossed = lora_state(model, grads=True)
    assert max(((crossed[n] - g).abs().max() / g.abs().max()).item() for n, g in expected_grads.items()) > 0.1


def test_gradient_accumulation_is_exact(model_dirs, tmp_path, seed, monkeypatch):
    """gradient_accumulation_steps=4 over micro-batches of 2 with unequal trainable-token counts gives the
    gradient of one batch of all 8 (and of the hand-made reference) at the optimizer step, and the same
    SGD step, because the Trainer's num_items_in_batch reaches loraforge's fused cross-entropy. Averaging
    the micro-batches' own means instead would give a measurably different gradient."""
    from loraforge.models import causal_lm_loss
    from transformers import TrainerCallback

    generator = torch.Generator().manual_seed(seed)
    lengths = [3, 5, 9, 17, 33, 48, 60, 70]
    sequences = [torch.randint(6, 400, (n,), generator=generator).tolist() for n in lengths]
    dataset = datasets.Dataset.from_dict({"input_ids": sequences})
    lora_b_seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    total = sum(n - 1 for n in lengths)

    seen_by_loss = []
    real = causal_lm_loss.fused_linear_cross_entropy

    def spy(*args, **kwargs):
        seen_by_loss.append(kwargs.get("num_items_in_batch"))
        return real(*args, **kwargs)

    monkeypatch.setattr(causal_lm_loss, "fused_linear_cross_entropy", spy)

    class GradientsAtStep(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads = lora_state(model, grads=True)

    def one_step(batch_size, accumulation):
        """(model, LoRA weights before, gradients at the optimizer step, recorded micro-batches)."""
        settings = sft.SFTSettings(model=str(model_dirs["llama"]), dataset=str(tmp_path), dtype="float32",
                                   load_in_4bit=False, r=8, lora_alpha=16, output_dir=str(tmp_path / f"ga{accumulation}"),
                                   per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                                   max_steps=1, learning_rate=1.0, warmup_steps=0, lr_scheduler_type="constant",
                                   weight_decay=0.0, optim="sgd", seed=seed % 1000)  # fmt: skip
        model, tokenizer = sft.load_model(settings)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=torch.Generator().manual_seed(lora_b_seed)) * 0.05
        grab = GradientsAtStep()
        trainer = sft.build_trainer(model, tokenizer, dataset, settings, callbacks=[grab])
        trainer.args.max_grad_norm = 0.0  # no clipping: the step is exactly -lr * gradient
        micro_batches = []
        compute_loss = trainer.compute_loss

        def record(model, inputs, return_outputs=False, num_items_in_batch=None):
            micro_batches.append(({k: v.clone() for k, v in inputs.items()}, int(num_items_in_batch)))
            return compute_loss(model, inputs, return_outputs, num_items_in_batch)

        trainer.compute_loss = record
        before = lora_state(model)
        seen_by_loss.clear()
        trainer.train()
        assert len(seen_by_loss) == accumulation and all(int(n) == total for n in seen_by_loss)
        after = lora_state(model)
        for name in before:  # SGD, lr 1: the step taken is minus the gradient seen
            torch.testing.assert_close(after[name], before[name] - grab.grads[name], rtol=0, atol=1e-6)
        return model, before, grab.grads, micro_batches

    model, before, accumulated, micro_batches = one_step(2, 4)
    assert len(micro_batches) == 4 and all(n == total for _, n in micro_batches)
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b, _ in micro_batches]
    assert sum(counts) == total and len(set(counts)) > 1
    _, before_big, big, _ = one_step(8, 1)
    assert all(torch.equal(before[n], before_big[n]) for n in before)

    _, reference = separate_loss_and_grads(model_with(before, model), sequences)
    assert_grads_close(accumulated, reference)
    assert_grads_close(big, reference)

    # What averaging each micro-batch's own mean would have given: far from the gradient used.
    model.zero_grad(set_to_none=True)
    for inputs, _ in micro_batches:
        (model(**inputs).loss / len(micro_batches)).backward()
    naive = lora_state(model, grads=True)
    scale = max(reference[n].abs().max().item() for n in reference)
    assert max((naive[n] - reference[n]).abs().max().item() for n in naive) > 0.01 * scale


def model_with(parameters, model):
    """`model` with its LoRA parameters set back to `parameters`."""
    for name, param in model.named_parameters():
        if name in parameters:
            param.data = parameters[name].clone()
    return model
