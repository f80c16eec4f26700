"""`loraforge quickstart`: the whole job on a tiny model, offline, on CPU, in about a minute.

It walks the path a real fine-tune takes, with the same code (loraforge.train.sft, which `loraforge sft`
runs): a tiny Llama and its tokenizer are built offline (loraforge.testing) and saved as a model folder,
loaded in 4-bit NF4 by FastLanguageModel, given LoRA adapters, fine-tuned by TRL's SFTTrainer on the
bundled conversations (assets/quickstart_conversations.jsonl) with the ChatML template and loss on the
replies only; then the adapter is saved, merged into a 16-bit checkpoint, and exported to GGUF (Q8_0
and Q4_K_M) with an Ollama Modelfile. A fixed question is answered before and after training, by the
merged checkpoint, and by llama.cpp from the Q4_K_M file when llama-cpp-python is installed.

Why the tiny model learns in a minute: its weights are drawn with a larger spread than usual
(initializer_range 0.08, not 0.02). With the usual spread its random lm_head can only move the logits
a little, so LoRA alone cannot make any token likely and the loss hardly falls; with the larger one
200 steps teach it the bundled replies word for word. The learning rate (1e-2) is high for the same
reason; real models take the practitioners' 2e-4 (what `loraforge sft` defaults to).
"""

from __future__ import annotations

import shutil
import time
from importlib import resources
from pathlib import Path

import torch

from loraforge.train import sft

QUESTION = "Who are you?"
DEFAULT_OUTPUT = "loraforge-quickstart"
DEFAULT_STEPS = 200
GGUF_QUANTIZATIONS = ("q8_0", "q4_k_m")
# The tiny base: hidden size a multiple of 256 so Q4_K_M really uses K-quant blocks.
TINY_MODEL = {"arch": "llama", "hidden_size": 256, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "intermediate_size": 512, "vocab_size": 768, "max_position_embeddings": 512, "initializer_range": 0.08}
# What the run creates inside the output folder; --overwrite removes these and nothing else.
OUTPUT_ENTRIES = ("base-model", "data", "adapter", "merged_16bit", "gguf", "checkpoints", "sft-llama-3.1-8b.yaml")
REAL_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


class QuickstartError(sft.SFTInputError):
    pass


def bundled_conversations() -> Path:
    return Path(str(resources.files("loraforge").joinpath("assets", "quickstart_conversations.jsonl")))


def settings_for(output: Path, steps: int, seed: int) -> sft.SFTSettings:
    """The tiny run's settings: the practitioners' defaults except where a tiny random model needs
    otherwise (see the module docstring)."""
    return sft.SFTSettings(
        model=str(output / "base-model"), dataset=str(output / "data" / "conversations.jsonl"),
        output_dir=str(output), chat_template="chatml", max_seq_length=256, load_in_4bit=True, dtype="float32",
        learning_rate=1e-2, per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=steps,
        warmup_steps=5, logging_steps=max(1, min(20, steps // 10)), seed=seed, responses_only=True,
        export=tuple(["merged_16bit"] + [f"gguf:{q}" for q in GGUF_QUANTIZATIONS]), overwrite=True,
    )  # fmt: skip


def real_model_command(output: Path) -> str:
    dataset = output / "data" / "conversations.jsonl"
    return (f"loraforge sft --model {REAL_MODEL} --dataset {dataset} \\\n"
            "    --chat-template llama-3.1 --responses-only --max-steps 60 --output my-llama-run \\\n"
            "    --export merged_16bit,gguf:q4_k_m")  # fmt: skip


def real_model_python(output: Path) -> str:
    dataset = output / "data" / "conversations.jsonl"
    return f'''\
from datasets import load_dataset
from trl import SFTConfig, SFTTrainer
from loraforge import FastLanguageModel, get_chat_template, standardize_sharegpt, train_on_responses_only

model, tokenizer = FastLanguageModel.from_pretrained("{REAL_MODEL}", max_seq_length=2048, load_in_4bit=True)
model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, use_gradient_checkpointing="unsloth")
tokenizer = get_chat_template(tokenizer, "llama-3.1")
dataset = standardize_sharegpt(load_dataset("json", data_files="{dataset}", split="train"))
dataset = dataset.rename_column("conversations", "messages")
trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=SFTConfig(
    per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=60, learning_rate=2e-4,
    warmup_steps=5, optim="adamw_8bit", output_dir="my-llama-run"))
trainer = train_on_responses_only(trainer)
trainer.train()
model.save_pretrained_merged("my-llama-run/merged_16bit", tokenizer, save_method="merged_16bit")
model.save_pretrained_gguf("my-llama-run/gguf", tokenizer, quantization_method="q4_k_m")'''


def real_model_yaml(output: Path) -> str:
    dataset = output.resolve() / "data" / "conversations.jsonl"
    return f"""\
# loraforge sft --config {output / 'sft-llama-3.1-8b.yaml'}
# The quickstart's fine-tune with a real model (a GPU with 16 GB or more). Flags given on the command
# line win over these values; `loraforge sft --help` lists every key.
model: {REAL_MODEL}
dataset: {dataset}
chat_template: llama-3.1
responses_only: true
max_seq_length: 2048
load_in_4bit: true
r: 16
lora_alpha: 16
learning_rate: 2.0e-4
per_device_train_batch_size: 2
gradient_accumulation_steps: 4
max_steps: 60
warmup_steps: 5
output_dir: my-llama-run
export: [merged_16bit, "gguf:q4_k_m"]
"""


def prepare_output(output: Path, overwrite: bool) -> None:
    existing = [name for name in OUTPUT_ENTRIES if (output / name).exists()]
    if existing and not overwrite:
        raise QuickstartError(f"{output} already holds a quickstart run ({', '.join(existing)}); "
                              "pass --overwrite to replace it, or --output to choose another folder")  # fmt: skip
    if output.exists() and not output.is_dir():
        raise QuickstartError(f"{output} exists and is not a folder")
    for name in existing:
        path = output / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (output / "data").mkdir(parents=True, exist_ok=True)


def answer(model, tokenizer, question: str = QUESTION, max_new_tokens: int = 40) -> str:
    """The greedy reply, from a prompt tokenized as in training (sft.encode_chat)."""
    ids = torch.tensor([sft.encode_chat(tokenizer, [{"role": "user", "content": question}], True)])
    ids = ids.to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def merged_answer(merged_dir: str, tokenizer) -> str:
    """The same question put to the merged checkpoint, loaded by plain transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    return answer(model, tokenizer)


def llama_cpp_answer(gguf_path: str, tokenizer, max_new_tokens: int = 40) -> str | None:
    """The question answered by llama.cpp from a GGUF file, or None without llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        return None
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                           add_generation_prompt=True)  # fmt: skip
    llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=256, n_threads=1, verbose=False)
    try:
        tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)  # as in training
        reply = []
        for token in llm.generate(tokens, temp=0.0, top_k=1):
            if llm.token_is_eog(token) if hasattr(llm, "token_is_eog") else token == llm.token_eos():
                break
            reply.append(token)
            if len(reply) >= max_new_tokens:
                break
        return llm.detokenize(reply).decode("utf-8", errors="replace").strip()
    finally:
        llm.close()


def _count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def run(output: str | Path = DEFAULT_OUTPUT, steps: int = DEFAULT_STEPS, overwrite: bool = False, seed: int = 3407,
        threads: int = 1, write=print) -> dict:  # fmt: skip
    """Run the quickstart; returns what it measured and wrote (see the keys at the end)."""
    from loraforge import testing

    if steps < 1:
        raise QuickstartError("--steps must be at least 1")
    started = time.perf_counter()
    output = Path(output).expanduser()
    if not torch.cuda.is_available() and threads:
        torch.set_num_threads(threads)  # a tiny model's matrices gain nothing from more threads
    prepare_output(output, overwrite)
    settings = settings_for(output, steps, seed)
    write(f"loraforge quickstart: a LoRA fine-tune, merge and GGUF export of a tiny model, offline -> {output}\n")

    testing.save_tiny_model(output / "base-model", seed=seed % 2**31, **TINY_MODEL)
    shutil.copyfile(bundled_conversations(), settings.dataset)
    (output / "sft-llama-3.1-8b.yaml").write_text(real_model_yaml(output), encoding="utf-8")
    model, tokenizer = sft.load_model(settings)
    trainable, total = _count_parameters(model)
    write(f"[1/6] Tiny Llama built offline ({TINY_MODEL['num_layers']} layers, hidden {TINY_MODEL['hidden_size']}, "
          f"{len(tokenizer)}-token BPE), loaded in 4-bit NF4, LoRA r={settings.r} alpha={settings.lora_alpha} on "
          f"all 7 projections: {trainable:,} of {total:,} parameters train")  # fmt: skip
    before = answer(model, tokenizer)
    write(f"      Q: {QUESTION}\n      A (before training): {before!r}")

    table = sft.load_table(settings.dataset)
    dataset = sft.tokenize_table(table, tokenizer)
    write(f"[2/6] Fine-tuning with TRL's SFTTrainer: {len(table)} conversations, ChatML template, loss on replies "
          f"only; {steps} steps of {settings.per_device_train_batch_size}, lr {settings.learning_rate:g}")  # fmt: skip
    trainer = sft.build_trainer(model, tokenizer, dataset, settings, [sft.progress_callback(write, steps)])
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    losses = sft.logged_losses(trainer)
    after = answer(model, tokenizer)
    write(f"      Q: {QUESTION}\n      A (after training):  {after!r}")

    adapter = sft.save_adapter(model, tokenizer, output, overwrite=True)
    write(f"[3/6] LoRA adapter saved (loads in plain PEFT) -> {adapter}")
    exports = sft.export_model(model, tokenizer, output, sft.parse_export_targets(settings.export), overwrite=True,
                               gguf_name="quickstart")  # fmt: skip
    merged = exports["merged_16bit"][0]
    merged_reply = merged_answer(merged, tokenizer)
    write(f"[4/6] Merged into a 16-bit checkpoint -> {merged}\n      A (merged, plain transformers): {merged_reply!r}")
    gguf_files = [path for path in exports["gguf"] if path.endswith(".gguf")]
    write(f"[5/6] GGUF for llama.cpp and Ollama ({', '.join(q.upper() for q in GGUF_QUANTIZATIONS)}) -> "
          f"{', '.join(gguf_files)}, with a Modelfile")  # fmt: skip
    gguf_reply = llama_cpp_answer(gguf_files[-1], tokenizer)
    if gguf_reply is not None:
        write(f"      A (llama.cpp, {Path(gguf_files[-1]).name}): {gguf_reply!r}")
    else:
        write("      (pip install llama-cpp-python to have llama.cpp answer from the GGUF file here)")

    seconds = time.perf_counter() - started
    tokens_per_second = trainer.tokens_seen / train_seconds if train_seconds > 0 else 0.0
    first, last = losses[0][1], sft.final_loss(losses)
    write(f"[6/6] Done in {seconds:.0f} s (training {train_seconds:.1f} s, {tokens_per_second:,.0f} tokens/s on "
          f"{'GPU' if torch.cuda.is_available() else 'CPU'}); loss {first:.2f} -> {last:.2f}\n")  # fmt: skip
    write("Next, the same with a real model on a GPU:\n")
    write("  " + real_model_command(output).replace("\n", "\n  "))
    write(f"\n  or: loraforge sft --config {output / 'sft-llama-3.1-8b.yaml'}\n")
    write("In Python:\n")
    write("  " + real_model_python(output).replace("\n", "\n  ") + "\n")
    write(f"Serve the GGUF: ollama create quickstart -f {Path(gguf_files[0]).parent / 'Modelfile'} "
          f"&& ollama run quickstart")  # fmt: skip

    return {
        "output": str(output), "steps": steps, "losses": losses, "before": before, "after": after,
        "merged_answer": merged_reply, "gguf_answer": gguf_reply, "seconds": seconds,
        "train_seconds": train_seconds, "tokens": trainer.tokens_seen, "tokens_per_second": tokens_per_second,
        "adapter": adapter, "merged": merged, "gguf": gguf_files, "files": exports,
    }  # fmt: skip
