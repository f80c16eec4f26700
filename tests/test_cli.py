"""`loraforge sft` and `loraforge export` on a tiny saved model, their errors, and every --help."""

import json
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


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = testing.save_tiny_model(root / "base", arch="llama", seed=1)
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    return root, base, data


@pytest.fixture(scope="module")
def trained(tiny_files):
    """One `loraforge sft` run from a YAML config, one flag overriding it; its output folder."""
    root, base, data = tiny_files
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(base), "dataset": str(data), "chat_template": "chatml", "responses_only": True,
        "max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
        "learning_rate": "1e-3",  # YAML reads 1e-3 as a string: the CLI converts it
        "export": ["gguf:q8_0"],
    }))  # fmt: skip
    output = root / "run"
    code = cli.main(["sft", "--config", str(config), "--max-steps", "3", "--logging-steps", "1", "--output", str(output)])
    assert code == 0
    return output


def test_sft_from_config_trains_saves_and_exports(trained, capsys):
    assert (trained / "adapter" / "adapter_config.json").is_file()
    assert (trained / "adapter" / "tokenizer_config.json").is_file()  # with its chat template, for export
    assert (trained / "gguf" / f"{trained.name}.Q8_0.gguf").is_file()
    assert (trained / "gguf" / "Modelfile").is_file()
    used = yaml.safe_load((trained / "sft_config.yaml").read_text())
    assert used["max_steps"] == 3  # the flag won over the config's 2
    assert used["chat_template"] == "chatml" and used["responses_only"] is True
    assert used["learning_rate"] == pytest.approx(1e-3) and used["r"] == 16 and used["lora_alpha"] == 16


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


@pytest.mark.parametrize(
    "args, message",
    [
        (["sft", "--dataset", "{data}"], "--model is required"),
        (["sft", "--model", "{base}", "--dataset", "{root}/missing.jsonl"], "does not exist"),
        (["sft", "--model", "{root}/no-model", "--dataset", "{data}"], "model folder"),
        (["sft", "--model", "{base}", "--dataset", "{data}", "--column", "prompt"], "columns are ['messages']"),
        (["sft", "--model", "{base}", "--dataset", "{data}", "--chat-template", "llama-9"], "valid names: chatml"),
        (["sft", "--model", "{base}", "--dataset", "{data}", "--export", "gguf:q9_k"], "valid: f32"),
        (["sft", "--model", "{base}", "--dataset", "{data}", "--export", "onnx"], "unknown export 'onnx'"),
        (["sft", "--model", "{base}", "--dataset", "{data}", "--learning-rate", "-1"], "must be positive"),
        (["sft", "--model", "{base}", "--dataset", "{data}", "--output", "{root}/t", "--target-modules", "qkv_proj"],
         "not modules of this model"),
        (["sft", "--config", "{root}/typo.yaml"], "unknown key 'lerning_rate'; valid keys:"),
        (["sft", "--config", "{root}/nothing.yaml"], "does not exist"),
        (["export", "--adapter", "{base}", "--output", "{root}/x", "--format", "merged_16bit"], "no adapter_config"),
        (["export", "--model", "{base}", "--output", "{root}/x", "--format", "lora"], "needs --adapter"),
        (["export", "--model", "{base}", "--output", "{root}/x", "--for", "ollama", "--format", "merged_16bit"],
         "--for ollama writes gguf"),
        (["export", "--model", "{base}", "--output", "{root}/x"], "--format"),
        (["quickstart", "--steps", "0"], "at least 1"),
    ],
)
def test_user_mistakes_exit_2_with_a_message(tiny_files, capsys, args, message):
    root, base, data = tiny_files
    (root / "typo.yaml").write_text(f"model: {base}\ndataset: {data}\nlerning_rate: 1e-3\n")
    code, out, err = run_cli(capsys, *(a.format(root=root, base=base, data=data) for a in args))
    assert code == 2
    assert message in err
    assert "Traceback" not in err + out


def test_sft_refuses_to_overwrite_an_adapter(trained, tiny_files, capsys):
    _, base, data = tiny_files
    code, _, err = run_cli(capsys, "sft", "--model", base, "--dataset", data, "--output", trained)
    assert code == 2 and "--overwrite" in err


@pytest.mark.parametrize(
    "command, expected",
    [
        ("sft", ["(default: 2e-4 for SFT", "5e-6", "default: 16)", "unsloth", "q4_k_m", "all 7", "--responses-only", "--config"]),
        ("export", ["q4_k_m", "merged_16bit", "vllm", "ollama", "llama.cpp", "base_model_name_or_path"]),
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
