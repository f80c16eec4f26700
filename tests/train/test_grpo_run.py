"""The pieces of `loraforge grpo` below the command line: reward names and weights, the reward functions they
build (scored against hand-worked answers), the checks made before anything loads, and the prompt table."""

import json
import random

import pytest
from loraforge import testing
from loraforge.data import get_chat_template
from loraforge.train import grpo_run
from loraforge.train.sft import SFTInputError

datasets = pytest.importorskip("datasets")


def settings(tmp_path, **overrides):
    base = {"model": str(tmp_path), "dataset": str(tmp_path), "rewards": ("numeric_answer",)}
    return grpo_run.GRPOSettings(**{**base, **overrides})


def test_reward_names_aliases_and_weights():
    assert grpo_run.parse_rewards("xml:0.5, numeric_answer:2,format") == [("xml_tags", 0.5), ("numeric_answer", 2.0),
                                                                         ("format", 1.0)]  # fmt: skip
    assert grpo_run.parse_rewards(["exact", "length_reward:-0.25", "Numeric-Answer:3"]) == [
        ("exact_answer", 1.0), ("length", -0.25), ("numeric_answer", 3.0)]  # fmt: skip
    for spec, message in [("speed", "unknown reward 'speed'"), ("xml:heavy", "must be a number"),
                          ("xml,xml_tags:2", "given twice"), ("", "no reward function"), ("xml:inf", "finite")]:  # fmt: skip
        with pytest.raises(SFTInputError, match=message):
            grpo_run.parse_rewards(spec)


def test_reward_functions_score_by_hand(tmp_path):
    """Each named reward against completions whose scores are worked out by hand, answers from the
    answer column given as TRL passes dataset columns (one per completion)."""
    chosen = settings(tmp_path, rewards=("format:1", "xml_tags:1", "exact_answer:1", "numeric_answer:1", "length:1"),
                      answer_column="solution", length_target=4, length_unit="words", numeric_tolerance=0.01)  # fmt: skip
    functions, weights = grpo_run.reward_functions(chosen)
    assert weights == [1.0] * 5
    good = "<reasoning>two and two</reasoning> <answer>4.001</answer>"
    completions = [good, "<answer>four</answer>", "the answer is 4", [{"role": "assistant", "content": good}]]
    golds = ["4", "Four", "4", "5"]
    scores = {f.__name__: f(prompts=["p"] * 4, completions=completions, solution=golds) for f in functions}
    assert scores["format_reward"] == [1.0, 0.0, 0.0, 1.0]
    assert scores["xml_tags_reward"] == [1.0, 0.375, 0.0, 1.0]  # half the tags present: 0.75 x 1/2
    assert scores["exact_answer_reward"] == [0.0, 1.0, 0.0, 0.0]  # "4.001" != "4"; "four" == "Four"
    assert scores["numeric_answer_reward"] == [1.0, 0.0, 1.0, 0.0]  # within 0.01; no number; last number 4; 4 != 5
    assert scores["length_reward"] == [1.0, 0.25, 1.0, 1.0]  # 4 words; 1 word: 1 - 3/4


def test_checks_before_anything_loads(tmp_path):
    with pytest.raises(SFTInputError, match="needs --length-target"):
        grpo_run.validate(settings(tmp_path, rewards=("length",)))
    with pytest.raises(SFTInputError, match="not a regular expression"):
        grpo_run.validate(settings(tmp_path, rewards=("format",), format_pattern="(<answer>"))
    with pytest.raises(SFTInputError, match="rewards: tags must be non-empty tag names"):
        grpo_run.validate(settings(tmp_path, rewards=("xml",), xml_tags=("a b",)))
    with pytest.raises(SFTInputError, match=r"\(6\) must be a multiple of num_generations \(4\)"):
        grpo_run.validate(settings(tmp_path, per_device_train_batch_size=3, gradient_accumulation_steps=2))
    grpo_run.validate(settings(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2))
    with pytest.raises(SFTInputError, match="loss_type"):
        grpo_run.validate(settings(tmp_path, loss_type="ppo"))
    with pytest.raises(SFTInputError, match="at least 2"):
        grpo_run.validate(settings(tmp_path, num_generations=1))


def test_prompt_table(tmp_path, seed):
    """Text prompts become [system, user] conversations, the prompt column is renamed, other columns stay
    for the rewards, and prompts longer than max_prompt_length tokens (as the model would see them) go."""
    rng = random.Random(seed)
    tokenizer = get_chat_template(testing.build_tokenizer(), "chatml")
    questions = [" ".join(rng.choice(["cats", "rain", "bread", "why", "is"]) for _ in range(rng.randint(1, 30)))
                 for _ in range(12)]  # fmt: skip
    rows = [{"question": q, "answer": str(i), "prompt": "stale"} for i, q in enumerate(questions)]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    system = "Think, then answer in <answer> tags."

    def rendered_length(question):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    limit = sorted(rendered_length(q) for q in questions)[5]
    chosen = settings(tmp_path, dataset=str(path), prompt_column="question", system_prompt=system,
                      max_prompt_length=limit)  # fmt: skip
    table, dropped = grpo_run.load_prompts(chosen, tokenizer)
    kept = [i for i, q in enumerate(questions) if rendered_length(q) <= limit]
    assert dropped == len(questions) - len(kept) and 6 <= len(kept) < len(questions)
    assert sorted(table.column_names) == ["answer", "prompt"]
    assert table["answer"] == [str(i) for i in kept]
    first = [{"role": "system", "content": system}, {"role": "user", "content": questions[kept[0]]}]
    assert table["prompt"][0] == first

    with pytest.raises(SFTInputError, match="no column 'query'"):
        grpo_run.load_prompts(settings(tmp_path, dataset=str(path), prompt_column="query"), tokenizer)
    with pytest.raises(SFTInputError, match="answer column 'gold'"):
        grpo_run.load_prompts(settings(tmp_path, dataset=str(path), answer_column="gold"), tokenizer)
    with pytest.raises(SFTInputError, match="every prompt is longer"):
        grpo_run.load_prompts(settings(tmp_path, dataset=str(path), prompt_column="question", max_prompt_length=1),
                              tokenizer)  # fmt: skip


def test_conversation_prompts(tmp_path):
    """Prompts given as chat messages (ShareGPT's from/value too) keep their turns; the system prompt goes
    in front of those that have none. Without a chat template they are refused with a hint."""
    tokenizer = get_chat_template(testing.build_tokenizer(), "chatml")
    system = {"role": "system", "content": "Be brief."}
    rows = [{"prompt": [{"from": "human", "value": "Hi?"}]},
            {"prompt": [{"from": "system", "value": "Be long."}, {"from": "human", "value": "Why?"}]}]  # fmt: skip
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    chosen = settings(tmp_path, dataset=str(path), rewards=("xml",), system_prompt=system["content"])
    table, dropped = grpo_run.load_prompts(chosen, tokenizer)
    assert dropped == 0
    assert table["prompt"] == [[system, {"role": "user", "content": "Hi?"}],
                               [{"role": "system", "content": "Be long."}, {"role": "user", "content": "Why?"}]]  # fmt: skip
    with pytest.raises(SFTInputError, match="no chat template"):
        grpo_run.load_prompts(chosen, testing.build_tokenizer(chat_template=None))
