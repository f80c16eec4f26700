"""`loraforge quickstart` end to end (shortened), and a projection of the default run's time."""

import re

import pytest
from loraforge import cli, quickstart

yaml = pytest.importorskip("yaml")

SHORT_STEPS = 40
# The README promises about a minute on a laptop CPU; this bounds the default run on a busy 2-core box.
DEFAULT_RUN_BUDGET_S = 150


def test_quickstart_end_to_end(tmp_path, capsys):
    output = tmp_path / "qs"
    code = cli.main(["quickstart", "--output", str(output), "--steps", str(SHORT_STEPS)])
    out = capsys.readouterr().out
    assert code == 0, out  # nonzero means the loss did not fall

    for path in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "merged_16bit/config.json",
                 "gguf/quickstart.Q8_0.gguf", "gguf/quickstart.Q4_K_M.gguf", "gguf/Modelfile",
                 "base-model/config.json", "data/conversations.jsonl"):  # fmt: skip
        assert (output / path).is_file(), path
    for phrase in ("A (before training)", "A (after training)", "A (merged, plain transformers)", "[6/6] Done in",
                   "loraforge sft --model meta-llama/Llama-3.1-8B-Instruct", "--chat-template llama-3.1",
                   "FastLanguageModel.from_pretrained(", "train_on_responses_only(trainer)", "ollama create"):  # fmt: skip
        assert phrase in out, phrase
    config = yaml.safe_load((output / "sft-llama-3.1-8b.yaml").read_text())
    assert config["model"] == quickstart.REAL_MODEL and config["learning_rate"] == 2e-4 and config["r"] == 16
    assert (output / "data" / "conversations.jsonl").read_bytes() == quickstart.bundled_conversations().read_bytes()

    losses = [float(x) for x in re.findall(r"step +\d+/\d+ +loss ([\d.]+)", out)]
    assert len(losses) == SHORT_STEPS // 4 and losses[-1] < losses[0]

    # The default run trains DEFAULT_STEPS steps of the same size; everything else is the same work.
    done = re.search(r"Done in (\d+) s \(training ([\d.]+) s, ([\d,]+) tokens/s", out)
    total, training = float(done.group(1)), float(done.group(2))
    projected = total - training + training / SHORT_STEPS * quickstart.DEFAULT_STEPS
    print(f"shortened run {total:.0f} s; default run projected at {projected:.0f} s")
    assert projected < DEFAULT_RUN_BUDGET_S

    # A second run into the same folder needs --overwrite.
    assert cli.main(["quickstart", "--output", str(output), "--steps", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_overwrite_removes_only_what_the_quickstart_made(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(quickstart.QuickstartError, match="--overwrite"):
        quickstart.prepare_output(tmp_path, overwrite=False)
    quickstart.prepare_output(tmp_path, overwrite=True)
    assert not (tmp_path / "adapter").exists() and (tmp_path / "notes.txt").read_text() == "mine"


def test_bundled_conversations_are_sharegpt_chats():
    import json

    rows = [json.loads(line) for line in quickstart.bundled_conversations().read_text().splitlines()]
    assert 60 <= len(rows) <= 150
    for row in rows:
        turns = row["conversations"]
        assert turns[-1]["from"] == "gpt" and {t["from"] for t in turns} <= {"system", "human", "gpt"}
    assert sum(quickstart.QUESTION == t["value"] for row in rows for t in row["conversations"]) >= 1
