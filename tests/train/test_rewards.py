"""loraforge.rewards: TRL's reward signature, plain and conversational completions, dataset columns as
keyword arguments, and malformed completions scoring instead of raising."""

import math
import re

import pytest

from loraforge import rewards


def chat(text):
    return [{"role": "assistant", "content": text}]


# What a model can hand a reward function when things go wrong, plus TRL's extra keyword arguments.
MALFORMED = [None, 17, 3.5, [], {}, [{"role": "assistant"}], [{"content": None}], ["not a dict"],
             [{"role": "assistant", "content": [{"type": "image"}]}], b"bytes"]  # fmt: skip
TRL_KWARGS = {"trainer_state": object(), "log_extra": lambda *a: None, "log_metric": lambda *a: None}


def call(fn, completions, **columns):
    out = fn(prompts=["p"] * len(completions), completions=completions, **columns, **TRL_KWARGS)
    assert isinstance(out, list) and len(out) == len(completions) and all(isinstance(v, float) for v in out)
    return out


def test_completion_text():
    assert rewards.completion_text("hi") == "hi"
    assert rewards.completion_text(chat("hi")) == "hi"
    content = [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]
    parts = [{"role": "assistant", "content": content}]
    assert rewards.completion_text(parts) == "ab"
    assert rewards.completion_text({"role": "assistant", "content": "x"}) == "x"
    assert [rewards.completion_text(m) for m in MALFORMED] == [None] * len(MALFORMED)


def test_format_reward_modes():
    search = rewards.format_reward(r"\d+")
    match = rewards.format_reward(r"\d+", mode="match")
    full = rewards.format_reward(r"<answer>\d+</answer>", mode="fullmatch", reward=2.0, miss=-1.0)
    texts = ["abc 12", "12 abc", "<answer>7</answer>", "<answer>7</answer>\n"]
    assert call(search, texts) == [1.0, 1.0, 1.0, 1.0]
    assert call(match, texts) == [0.0, 1.0, 0.0, 0.0]
    assert call(full, texts) == [-1.0, -1.0, 2.0, -1.0]
    assert call(full, [chat(t) for t in texts]) == [-1.0, -1.0, 2.0, -1.0]
    # DOTALL by default: reasoning spans lines.
    assert call(rewards.format_reward(r"<r>.*</r>", mode="fullmatch"), ["<r>a\nb</r>"]) == [1.0]
    assert call(rewards.format_reward(re.compile("x")), ["x"]) == [1.0]
    assert call(full, MALFORMED) == [-1.0] * len(MALFORMED)
    assert search.__name__ == "format_reward"
    with pytest.raises(ValueError):
        rewards.format_reward("x", mode="contains")


def test_xml_tags_reward_scoring():
    fn = rewards.xml_tags_reward(("reasoning", "answer"))
    cases = {
        "<reasoning>think</reasoning>\n<answer>4</answer>": 1.0,  # both, in order
        "<answer>4</answer><reasoning>think</reasoning>": 0.75,  # both, wrong order
        "<reasoning>think</reasoning>": 0.375,  # one of two
        "<reasoning>a</reasoning><reasoning>b</reasoning><answer>4</answer>": 0.375,  # twice: not well formed
        "</answer>4<answer>": 0.0,  # close before open
        "<reasoning><answer>4</answer></reasoning>": 0.75,  # nested, not in order
        "plain text": 0.0,
    }
    assert call(fn, list(cases)) == list(cases.values())
    assert call(fn, [chat(t) for t in cases]) == list(cases.values())
    assert call(fn, MALFORMED) == [0.0] * len(MALFORMED)

    strict = rewards.xml_tags_reward(("reasoning", "answer"), allow_outside_text=False, scale=2.0)
    laid_out = [" <reasoning>a</reasoning>\n<answer>b</answer>\n", "so: <reasoning>a</reasoning><answer>b</answer>",
                "<reasoning>a</reasoning> and <answer>b</answer>"]  # fmt: skip
    assert call(strict, laid_out) == [2.0, 1.5, 1.5]
    for bad in [(), ("a", "a"), ("a b",), ("<a>",)]:
        with pytest.raises(ValueError):
            rewards.xml_tags_reward(bad)


def test_extract_answer_and_parse_number():
    assert rewards.extract_answer("so <answer> 42 </answer>") == "42"
    assert rewards.extract_answer("<answer>1</answer> then <answer>2</answer>") == "2"
    assert rewards.extract_answer(r"thus \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert rewards.extract_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert rewards.extract_answer("  just this ") == "just this"
    assert rewards.parse_number("about 1,234.5 dollars") == 1234.5
    assert rewards.parse_number("3/4") == 0.75
    assert rewards.parse_number("$-12") == -12.0
    assert rewards.parse_number("1e3 or 7") == 7.0
    assert rewards.parse_number("-7e3") == -7000.0
    assert rewards.parse_number(".5") == 0.5
    for bad in ["none", "", None, "1/0", True, float("nan"), [1]]:
        assert rewards.parse_number(bad) is None


def test_exact_answer_reward_reads_the_column():
    fn = rewards.exact_answer_reward("answer")
    completions = ["<reasoning>x</reasoning><answer>Paris.</answer>", chat("<answer> paris </answer>"), "London",
                   "<answer>Rome</answer>", None]  # fmt: skip
    golds = ["paris", "Paris", "Paris", "#### Rome", "Paris"]
    assert call(fn, completions, answer=golds) == [1.0, 1.0, 0.0, 1.0, 0.0]
    # Numbers in the column compare as text; a missing column or a wrong-length one scores misses.
    assert call(fn, ["<answer>72</answer>"], answer=[72]) == [1.0]
    assert call(fn, ["<answer>72</answer>"]) == [0.0]
    assert call(fn, ["<answer>72</answer>"], answer=["72", "73"]) == [0.0]
    exact = rewards.exact_answer_reward("label", extract=None, normalize=False, reward=3.0)
    assert call(exact, ["Yes", "yes"], label=["Yes", "Yes"]) == [3.0, 0.0]

    def broken_extract(text):
        raise RuntimeError("boom")

    assert call(rewards.exact_answer_reward(extract=broken_extract), ["a"], answer=["a"]) == [0.0]


def test_numeric_answer_reward_tolerance():
    fn = rewards.numeric_answer_reward("answer", tolerance=0.01)
    completions = ["<answer>3.14</answer>", "The total is 1,000", chat("#### 72"), "<answer>3.2</answer>",
                   "no number", [{"role": "assistant"}]]  # fmt: skip
    golds = ["3.141", "1000", "Natalia... #### 72", 3.14159, "5", "5"]
    assert call(fn, completions, answer=golds) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    relative = rewards.numeric_answer_reward(tolerance=0.01, relative=True)
    assert call(relative, ["1005", "1011"], answer=[1000, 1000]) == [1.0, 0.0]
    assert call(fn, ["<answer>1</answer>"], answer=[None]) == [0.0]
    with pytest.raises(ValueError):
        rewards.numeric_answer_reward(tolerance=-1)
    with pytest.raises(TypeError):
        rewards.numeric_answer_reward(tolerance=float("inf"))


def test_length_reward_shapes():
    fn = rewards.length_reward(10, tolerance=2, scale=4)
    texts = ["x" * 10, "x" * 12, "x" * 14, "x" * 16, "x" * 7, chat("x" * 10), None]
    assert call(fn, texts) == [1.0, 1.0, 0.5, 0.0, 0.75, 1.0, 0.0]
    cap = rewards.length_reward(5, unit="words", only_longer=True)
    assert call(cap, ["one", "a b c d e", "a b c d e f g h i j"]) == [1.0, 1.0, 0.0]
    tokens = rewards.length_reward(4, unit="tokens")
    assert call(tokens, ["a", "b", "c"], completion_ids=[[1, 2, 3, 4], [1, 2], None]) == [1.0, 0.5, 0.0]
    assert call(tokens, ["a"]) == [0.0]  # no completion_ids passed
    for bad in [{"target": -1}, {"target": 1.5}, {"target": 3, "unit": "bytes"}, {"target": 0, "scale": 0}]:
        with pytest.raises((ValueError, TypeError)):
            rewards.length_reward(**bad)


def test_combine_rewards_weights_and_failures():
    a = rewards.format_reward("yes")
    b = rewards.length_reward(3)
    combined = rewards.combine_rewards([(a, 2.0), (b, 0.5)])
    assert combined.__name__ == "combined_reward"
    assert call(combined, ["yes", "no", None]) == [2.5, 0.5 * (1 - 1 / 3), 0.0]

    def raises(prompts, completions, **kwargs):
        raise KeyError("answer")

    def wrong_length(prompts, completions, **kwargs):
        return [1.0]

    def odd_values(prompts, completions, **kwargs):
        return [None, math.nan, 1]

    robust = rewards.combine_rewards([(raises, 1.0), (wrong_length, 1.0), (odd_values, 3.0), (a, 1.0)])
    with pytest.warns(RuntimeWarning) as record:
        assert call(robust, ["yes", "x", "y"]) == [1.0, 0.0, 3.0]
    messages = " ".join(str(w.message) for w in record)
    assert "'raises' raised KeyError" in messages and "'wrong_length' returned 1 values" in messages
    for bad in [[], [(a,)], [("f", 1.0)], [(a, "heavy")]]:
        with pytest.raises((ValueError, TypeError)):
            rewards.combine_rewards(bad)


def test_reward_functions_take_trls_call():
    """TRL calls fn(prompts=..., completions=..., completion_ids=..., <columns>, trainer_state=..., ...)."""
    fns = [rewards.format_reward("a"), rewards.xml_tags_reward(), rewards.exact_answer_reward(),
           rewards.numeric_answer_reward(), rewards.length_reward(5),
           rewards.combine_rewards([(rewards.length_reward(5), 1.0)])]  # fmt: skip
    for fn in fns:
        out = fn(prompts=[chat("q")] * 2, completions=[chat("a 1"), chat("b 2")], completion_ids=[[1], [2, 3]],
                 answer=["1", "2"], **TRL_KWARGS)  # fmt: skip
        assert len(out) == 2
