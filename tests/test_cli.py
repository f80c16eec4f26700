"""`loraforge sft`, `loraforge grpo` and `loraforge export` on a tiny saved model, their summaries, their
errors, and every --help."""

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from loraforge import cli, testing

yaml = pytest.importorskip("yaml")

CONVERSATIONS = [
    [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": f"It is {a + b}."}]
    for a in range(3)
    for b in range(3)
]


def run_cli(capsys, *args):
    """(exit status, stdout, stderr) of cli.main(args), in-process."""
    code = cli.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


QUESTIONS = [{"question": f"What is {a} plus {b}?", "answer": str(a + b)} for a in range(3) for b in range(3)]
QUESTIONS.append({"question": "Why? " * 40, "answer": "0"})  # longer than --max-prompt-length below


def main_output(args) -> tuple[int, str]:
    """(exit status, stdout) of cli.main(args), for module-scoped fixtures (capsys is per test)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main([str(arg) for arg in args])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = testing.save_tiny_model(root / "base", arch="llama", seed=1)
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    (root / "questions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in QUESTIONS))
    return root, base, data


@pytest.fixture(scope="module")
def trained(sft_run):
    return sft_run[0]


@pytest.fixture(scope="module")
def sft_run(tiny_files):
    """One `loraforge sft` run from a YAML config, one flag overriding it; (output folder, stdout)."""
    root, base, data = tiny_files
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(base), "dataset": str(data), "chat_template": "chatml", "responses_only": True,
        "max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
        "learning_rate": "1e-3",  # YAML reads 1e-3 as a string: the CLI converts it
        "export": ["gguf:q8_0"], "offload_embedding": "auto",  # (the default, spelled out: a no-op on CPU)
    }))  # fmt: skip
    output = root / "run"
    code, text = main_output(["sft", "--config", config, "--max-steps", 3, "--logging-steps", 1, "--output", output])
    assert code == 0
    return output, text


def test_sft_summary_says_time_speed_loss_and_files(sft_run):
    output, text = sft_run
    losses = [float(x) for x in re.findall(r"^  step \d/3  loss (\d+\.\d+)", text, re.MULTILINE)]
    assert len(losses) == 3
    summary = r"^trained 3 steps in (\d+\.\d) s, ([\d,]+) tokens/s; final loss (\d+\.\d{4})$"
    found = re.search(summary, text, re.MULTILINE)
    assert found, text
    assert float(found.group(2).replace(",", "")) > 0
    assert float(found.group(3)) == pytest.approx(sum(losses) / 3, abs=2e-4)  # the mean of the logged losses
    assert f"adapter: {output / 'adapter'}" in text
    assert f"gguf: {output / 'gguf' / (output.name + '.Q8_0.gguf')}" in text
    assert f"settings: {output / 'sft_config.yaml'}" in text


@pytest.fixture(scope="module")
def grpo_run(tiny_files):
    """One `loraforge grpo` run: rewards from a YAML mapping, the rest from flags; (output folder, stdout)."""
    root, base, _ = tiny_files
    config = root / "grpo.yaml"
    config.write_text(yaml.safe_dump({"model": str(base), "dataset": str(root / "questions.jsonl"),
                                      "prompt_column": "question", "max_steps": 5,
                                      "rewards": {"xml_tags": 0.5, "numeric_answer": 2.0, "length": 0.25}}, sort_keys=False))  # fmt: skip
    output = root / "grpo"
    code, text = main_output(["grpo", "--config", config, "--max-steps", "2", "--num-generations", "2",
                              "--max-completion-length", "4", "--max-prompt-length", "96", "--length-target", "3",
                              "--system-prompt", "Answer in <answer> tags.", "--output", output, "--export",
                              "merged_16bit", "--stream-base-weights"])  # fmt: skip
    assert code == 0
    return output, text


def test_grpo_trains_saves_exports_and_summarises(grpo_run):
    output, text = grpo_run
    assert (output / "adapter" / "adapter_config.json").is_file()
    assert (output / "merged_16bit" / "config.json").is_file()
    used = yaml.safe_load((output / "grpo_config.yaml").read_text())
    assert used["max_steps"] == 2  # the flag won over the config's 5
    assert used["stream_base_weights"] is True  # trained and merged from host-held base weights
    assert used["rewards"] == ["xml_tags:0.5", "numeric_answer:2.0", "length:0.25"]
    assert used["learning_rate"] == pytest.approx(5e-6) and used["loss_type"] == "dapo" and used["beta"] == 0
    assert "1 of 10 prompts are longer than 96 tokens (--max-prompt-length) and are left out\n  step 1/2" in text
    rewards = [float(x) for x in re.findall(r"^  step \d/2  loss -?\d+\.\d+  reward (-?\d+\.\d+)", text, re.MULTILINE)]
    assert len(rewards) == 2 and all(0 <= r <= 2.75 for r in rewards)  # weights 0.5 + 2 + 0.25, each reward in [0, 1]
    summary = r"^trained 2 steps in \d+\.\d s, ([\d,]+) tokens/s \(prompts and completions\)$"
    found = re.search(summary, text, re.MULTILINE)
    assert found and float(found.group(1).replace(",", "")) > 0
    assert f"mean reward {rewards[0]:.4f} at step 1 -> {rewards[1]:.4f} at step 2" in text
    assert f"adapter: {output / 'adapter'}" in text and f"merged_16bit: {output / 'merged_16bit'}" in text
    assert f"settings: {output / 'grpo_config.yaml'}" in text


def test_sft_from_config_trains_saves_and_exports(trained, capsys):
    assert (trained / "adapter" / "adapter_config.json").is_file()
    assert (trained / "adapter" / "tokenizer_config.json").is_file()  # with its chat template, for export
    assert (trained / "gguf" / f"{trained.name}.Q8_0.gguf").is_file()
    assert (trained / "gguf" / "Modelfile").is_file()
    used = yaml.safe_load((trained / "sft_config.yaml").read_text())
    assert used["max_steps"] == 3  # the flag won over the config's 2
    assert used["chat_template"] == "chatml" and used["responses_only"] is True
    assert used["learning_rate"] == pytest.approx(1e-3) and used["r"] == 16 and used["lora_alpha"] == 16
    assert used["offload_embedding"] == "auto"


def test_export_adapter_to_merged_16bit_matches_peft(trained, tiny_files, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, base, _ = tiny_files
    output = trained.parent / "merged"
    code, out, err = run_cli(capsys, "export", "--adapter", trained / "adapter", "--output", output, "--format",
                             "merged_16bit")  # fmt: skip
    assert code == 0, err
    assert "vllm serve" in out
    merged = AutoModelForCausalLM.from_pretrained(output, attn_implementation="eager")
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager"),
                                          trained / "adapter")  # fmt: skip
    ids = torch.tensor([[0, 7, 42, 99, 3, 250]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_export_adapter_to_gguf_q8_0_and_for_ollama(trained, capsys):
    import gguf

    output = trained.parent / "gguf-q8"
    code, out, err = run_cli(capsys, "export", "--adapter", trained / "adapter", "--output", output, "--format", "gguf",
                             "--quantization", "q8_0")  # fmt: skip
    assert code == 0, err
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(output / "gguf-q8.Q8_0.gguf")).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0"

    ollama = trained.parent / "ollama"
    code, out, err = run_cli(capsys, "export", "--adapter", trained / "adapter", "--output", ollama, "--for", "ollama")
    assert code == 0, err
    assert (ollama / "ollama.Q4_K_M.gguf").is_file()
    assert "<|im_end|>" in (ollama / "Modelfile").read_text()  # the chat template saved with the adapter
    assert "ollama create" in out


GRPO = ["grpo", "--model", "{base}", "--dataset", "{questions}", "--prompt-column", "question", "--output", "{root}/g"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["sft", "--dataset", "{data}"], "--model is required"),
        (["sft", "--model", "{base}", "--dataset", "{root}/missing.jsonl"], "does not exist"),
        (["sft", "--model", "{root}/no-model", "--dataset", "{data}"], "model folder"),
        (["sft", "--model", "{base}", "--dataset", "{data}", "--output", "{root}/c", "--column", "x"], "no column 'x'"),
        (["sft", "--model", "{base}", "--dataset", "{data}", "--chat-template", "llama-9"], "valid names: chatml"),
        (["sft", "--model", "{base}", "--dataset", "{data}", "--export", "gguf:q9_k"], "valid: f32"),
        (["sft", "--model", "{base}", "--dataset", "{data}", "--export", "onnx"], "unknown export 'onnx'"),
        (["sft", "--model", "{base}", "--dataset", "{data}", "--learning-rate", "-1"], "must be positive"),
        (["sft", "--model", "{base}", "--dataset", "{data}", "--output", "{root}/t", "--target-modules", "qkv_proj"],
         "not modules of this model"),
        (["sft", "--model", "{base}", "--dataset", "{data}", "--stream-base-weights", "--no-load-in-4bit"],
         "needs --load-in-4bit"),
        (["sft", "--model", "{base}", "--dataset", "{data}", "--offload-embedding"],
         "--offload-embedding: offload_embedding moves a GPU table to host memory"),
        (["sft", "--config", "{root}/typo.yaml"], "unknown key 'lerning_rate'; valid keys:"),
        (["sft", "--config", "{root}/nothing.yaml"], "does not exist"),
        (["sft", "--config", "{root}/offload.yaml"], "offload_embedding: expected true or false, got 'sometimes'"),
        (["export", "--adapter", "{base}", "--output", "{root}/x", "--format", "merged_16bit"], "no adapter_config"),
        (["export", "--model", "{base}", "--output", "{root}/x", "--format", "lora"], "needs --adapter"),
        (["export", "--model", "{base}", "--output", "{root}/x", "--for", "ollama", "--format", "merged_16bit"],
         "--for ollama writes gguf"),
        (["export", "--model", "{base}", "--output", "{root}/x"], "--format"),
        (["quickstart", "--steps", "0"], "at least 1"),
        (GRPO, "--rewards is required"),
        ([*GRPO, "--rewards", "speed"], "unknown reward 'speed'"),
        ([*GRPO, "--rewards", "xml:lots"], "must be a number"),
        ([*GRPO, "--rewards", "length"], "needs --length-target"),
        ([*GRPO, "--rewards", "xml", "--prompt-column", "prompt"], "no column 'prompt'"),
        ([*GRPO, "--rewards", "numeric", "--answer-column", "solution"], "column 'solution', which the dataset lacks"),
        ([*GRPO, "--rewards", "xml", "--batch-size", "3"], "must be a multiple of num_generations (4)"),
        ([*GRPO, "--rewards", "xml", "--num-generations", "1"], "at least 2"),
        ([*GRPO, "--rewards", "xml", "--loss-type", "ppo"], "invalid choice: 'ppo'"),
        ([*GRPO, "--rewards", "xml", "--max-completion-length", "255"], "exceeds the context of 256 tokens"),
        ([*GRPO, "--rewards", "xml", "--max-prompt-length", "2", "--max-completion-length", "4"], "every prompt"),
    ],
)
def test_user_mistakes_exit_2_with_a_message(tiny_files, capsys, args, message):
    root, base, data = tiny_files
    (root / "typo.yaml").write_text(f"model: {base}\ndataset: {data}\nlerning_rate: 1e-3\n")
    (root / "offload.yaml").write_text(f"model: {base}\ndataset: {data}\noffload_embedding: sometimes\n")
    names = {"root": root, "base": base, "data": data, "questions": root / "questions.jsonl"}
    code, out, err = run_cli(capsys, *(a.format(**names) for a in args))
    assert code == 2
    assert message in err
    assert "Traceback" not in err + out


def test_sft_refuses_to_overwrite_an_adapter(trained, tiny_files, capsys):
    _, base, data = tiny_files
    code, _, err = run_cli(capsys, "sft", "--model", base, "--dataset", data, "--output", trained)
    assert code == 2 and "--overwrite" in err


GRPO_HELP = ["(default: 5e-6; SFT", "compared with each other (default: 4)", "(default: 256)", "(default: dapo)",
             "skips the reference model (default: 0)", "--rewards", "numeric_answer", "exact_answer", "(required)",
             "--config", "unsloth", "default: 16)", "(default: prompt)", "(default: answer)", "--export"]  # fmt: skip


@pytest.mark.parametrize(
    "command, expected",
    [
        ("sft", ["(default: 2e-4 for SFT", "5e-6", "default: 16)", "unsloth", "q4_k_m", "all 7", "--responses-only", "--config"]),
        ("export", ["q4_k_m", "merged_16bit", "vllm", "ollama", "llama.cpp", "base_model_name_or_path"]),
        ("grpo", GRPO_HELP),
        ("quickstart", ["loraforge-quickstart", "default: 200", "--overwrite"]),
        ("env", ["--json", "compute capability"]),
        ("demo", ["default: 40"]),
    ],
)
def test_help_mentions_the_defaults(capsys, command, expected):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    text = " ".join(out.split())  # argparse wraps lines
    for phrase in expected:
        assert phrase in text, phrase


def test_installed_entry_point_runs_env():
    script = Path(sys.executable).parent / "loraforge"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "loraforge.cli"]
    result = subprocess.run([*command, "env"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "torch" in result.stdout and "_core" in result.stdout and "bitsandbytes" in result.stdout


def test_dataset_files_the_cli_reads(tmp_path):
    """JSONL (ShareGPT or role/content), Parquet, CSV with text, a save_to_disk folder: same token ids."""
    import datasets
    from loraforge.data import get_chat_template
    from loraforge.train import sft

    tokenizer = get_chat_template(testing.build_tokenizer(), "chatml")
    expected = [sft.encode_chat(tokenizer, c) for c in CONVERSATIONS]
    sharegpt = [[{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in c]
                for c in CONVERSATIONS]  # fmt: skip
    (tmp_path / "sharegpt.jsonl").write_text("".join(json.dumps({"conversations": c}) + "\n" for c in sharegpt))
    table = datasets.Dataset.from_dict({"messages": CONVERSATIONS, "id": list(range(len(CONVERSATIONS)))})
    table.to_parquet(tmp_path / "chats.parquet")
    datasets.DatasetDict({"train": table}).save_to_disk(tmp_path / "saved")
    for source in ("sharegpt.jsonl", "chats.parquet", "saved"):
        tokenized = sft.tokenize_table(sft.load_table(tmp_path / source), tokenizer)
        assert tokenized.column_names == ["input_ids"] and tokenized["input_ids"] == expected, source

    (tmp_path / "plain.csv").write_text("text,source\nThe sky is blue.,a\n")
    (ids,) = sft.tokenize_table(sft.load_table(tmp_path / "plain.csv"), tokenizer)["input_ids"]
    assert ids == tokenizer("The sky is blue." + tokenizer.eos_token)["input_ids"]  # bos from the tokenizer, eos added

    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(sft.SFTInputError, match="unknown file type '.txt'"):
        sft.load_table(tmp_path / "notes.txt")
    with pytest.raises(sft.SFTInputError, match="none of the columns"):
        sft.find_column(table.rename_column("messages", "chat"), None)
