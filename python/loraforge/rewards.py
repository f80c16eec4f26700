"""Reward functions for GRPO, in TRL's shape: `fn(prompts, completions, **kwargs) -> list[float]`.

Each factory here returns such a function. TRL calls it with one entry per completion: `completions`
are strings (plain datasets) or lists of message dicts (conversational datasets: the assistant's
reply is the last message, its "content" a string or a list of {"type": "text", "text": ...} parts),
and every other dataset column comes in as a keyword argument, a list aligned with `completions`
(so `answer_column="answer"` reads `kwargs["answer"][i]`). TRL also passes `completion_ids`,
`trainer_state` and logging callbacks; functions here ignore what they do not use.

A completion that cannot be read (None, a number, a message without content, a regex that does not
fit, an answer that does not parse) scores the function's `miss` value (0.0 by default); a reward
function never raises on model output, since one odd sample must not stop a training run. Arguments
given to the factories themselves are checked at once and do raise.

    from loraforge import rewards
    reward = rewards.combine_rewards([
        (rewards.xml_tags_reward(("reasoning", "answer")), 0.5),
        (rewards.numeric_answer_reward("answer", tolerance=1e-4), 2.0),
    ])
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], ...)
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from collections.abc import Callable, Sequence

__all__ = [
    "combine_rewards",
    "completion_text",
    "exact_answer_reward",
    "extract_answer",
    "format_reward",
    "length_reward",
    "numeric_answer_reward",
    "parse_number",
    "xml_tags_reward",
]

RewardFunction = Callable[..., list[float]]


# ---------------------------------------------------------------------------------------------
# Reading completions and answers.


def completion_text(completion) -> str | None:
    """The text of one completion: a string as it is; a conversation's last message's content (string,
    or the text parts of a list of content parts joined); a single message dict's content. None when
    there is no text to be had."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, (list, tuple)) and completion:
        last = completion[-1]
        return _content_text(last.get("content")) if isinstance(last, dict) else None
    return None


def _content_text(content) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        parts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        parts = [p for p in parts if isinstance(p, str)]
        return "".join(parts) if parts else None
    return None


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")


def extract_answer(text: str | None) -> str | None:
    """The final answer in a model's reply, by the usual conventions, first match wins: the last
    <answer>...</answer>, the last \\boxed{...}, what follows the last "####" (GSM8K), else the whole
    text. Stripped; None for None."""
    if text is None:
        return None
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        return tagged[-1].strip()
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    return text.strip()


_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?")


def parse_number(text) -> float | None:
    """The last number in `text` as a float ("1,234.5" -> 1234.5, "3/4" -> 0.75, "$12" -> 12.0,
    "-7e3" -> -7000.0); numbers pass through; None when there is none or it is not finite."""
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return float(text) if math.isfinite(text) else None
    if not isinstance(text, str):
        return None
    found = _NUMBER.findall(text)
    if not found:
        return None
    token = found[-1].replace(",", "").replace(" ", "")
    try:
        if "/" in token:
            numerator, denominator = token.split("/")
            value = float(numerator) / float(denominator)
        else:
            value = float(token)
    except (ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) else None


def _normalise(text: str) -> str:
    """Case, surrounding whitespace and punctuation, inner runs of whitespace: what a comparison of
    short answers should not care about."""
    return " ".join(text.casefold().split()).strip(" .,;:!?\"'`")


def _column(kwargs: dict, name: str, count: int) -> list:
    """A dataset column from TRL's keyword arguments, one value per completion (None if missing)."""
    values = kwargs.get(name)
    if not isinstance(values, (list, tuple)) or len(values) != count:
        return [None] * count
    return list(values)


def _named(function, name: str):
    # TRL logs each reward function under its __name__ (rewards/<name>/mean).
    function.__name__ = function.__qualname__ = name
    return function


def _check_number(name: str, value, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return float(value)


# ---------------------------------------------------------------------------------------------
# Rewards.


def format_reward(pattern: str | re.Pattern, *, mode: str = "search", flags: int = re.DOTALL,
                  reward: float = 1.0, miss: float = 0.0, name: str = "format_reward") -> RewardFunction:  # fmt: skip
    """`reward` when the completion's text matches `pattern`, else `miss`.

    mode: "search" (anywhere), "match" (at the start) or "fullmatch" (the whole text). flags apply
    to a string pattern (DOTALL by default, so "." crosses lines as reasoning text does)."""
    if mode not in ("search", "match", "fullmatch"):
        raise ValueError(f"mode must be 'search', 'match' or 'fullmatch', got {mode!r}")
    compiled = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern, flags)
    test = getattr(compiled, mode)
    reward, miss = _check_number("reward", reward), _check_number("miss", miss)

    def score(prompts, completions, **kwargs) -> list[float]:
        out = []
        for completion in completions:
            text = completion_text(completion)
            out.append(reward if text is not None and test(text) else miss)
        return out

    return _named(score, name)


def _tag_spans(text: str, tag: str) -> list[tuple[int, int]] | None:
    """[(start of <tag>, end of </tag>)] when <tag> and </tag> each occur exactly once, in that order."""
    opens = [m.start() for m in re.finditer(re.escape(f"<{tag}>"), text)]
    closes = [m.end() for m in re.finditer(re.escape(f"</{tag}>"), text)]
    if len(opens) != 1 or len(closes) != 1 or opens[0] >= closes[0]:
        return None
    return [(opens[0], closes[0])]


def xml_tags_reward(tags: Sequence[str] = ("reasoning", "answer"), *, presence_weight: float = 0.75,
                    order_weight: float = 0.25, allow_outside_text: bool = True, scale: float = 1.0,
                    miss: float = 0.0, name: str = "xml_tags_reward") -> RewardFunction:  # fmt: skip
    """Partial credit for a reply laid out as <tag>...</tag> blocks, e.g. <reasoning>..</reasoning>
    <answer>..</answer>. Per completion, in [0, scale]:

    * presence: presence_weight x (fraction of `tags` whose <tag> and </tag> each occur exactly once,
      open before close);
    * order: order_weight when every tag is well formed and the blocks come in the given order
      without overlapping (and, with allow_outside_text=False, nothing but whitespace around them).

    The weights are normalised to sum to 1; `scale` multiplies the result. An unreadable completion
    scores `miss`."""
    tags = tuple(tags)
    if not tags or not all(isinstance(t, str) and t and re.fullmatch(r"[\w.:-]+", t) for t in tags):
        raise ValueError(f"tags must be non-empty tag names (letters, digits, _ . : -), got {tags!r}")
    if len(set(tags)) != len(tags):
        raise ValueError(f"tags must be distinct, got {tags!r}")
    presence_weight = _check_number("presence_weight", presence_weight, 0.0)
    order_weight = _check_number("order_weight", order_weight, 0.0)
    if presence_weight + order_weight == 0:
        raise ValueError("presence_weight + order_weight must be > 0")
    total = presence_weight + order_weight
    presence_weight, order_weight = presence_weight / total, order_weight / total
    scale, miss = _check_number("scale", scale), _check_number("miss", miss)

    def one(text: str) -> float:
        spans = [_tag_spans(text, tag) for tag in tags]
        formed = sum(s is not None for s in spans)
        value = presence_weight * formed / len(tags)
        if formed == len(tags):
            blocks = [s[0] for s in spans]
            in_order = all(a[1] <= b[0] for a, b in itertools.pairwise(blocks))
            if in_order and not allow_outside_text:
                gaps = [text[: blocks[0][0]], text[blocks[-1][1] :]]
                gaps += [text[a[1] : b[0]] for a, b in itertools.pairwise(blocks)]
                in_order = all(not gap.strip() for gap in gaps)
            value += order_weight if in_order else 0.0
        return scale * value

    def score(prompts, completions, **kwargs) -> list[float]:
        out = []
        for completion in completions:
            text = completion_text(completion)
            out.append(miss if text is None else one(text))
        return out

    return _named(score, name)


def exact_answer_reward(answer_column: str = "answer", extract: Callable[[str], str | None] | None = extract_answer,
                        *, normalize: bool = True, reward: float = 1.0, miss: float = 0.0,
                        name: str = "exact_answer_reward") -> RewardFunction:  # fmt: skip
    """`reward` when the answer extracted from the completion equals the dataset's `answer_column`
    (itself passed through the same extraction, so a GSM8K "... #### 72" gold reads "72"), else `miss`.

    extract: text -> answer (default `extract_answer`: <answer> tag, \\boxed{}, "####", else the text);
    None compares whole texts. normalize: compare case-, whitespace- and end-punctuation-insensitively."""
    reward, miss = _check_number("reward", reward), _check_number("miss", miss)
    get = extract if extract is not None else (lambda text: text)

    def answer_of(value) -> str | None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            return None
        try:
            found = get(value)
        except Exception:  # noqa: BLE001 (a user's extractor failing on odd model output is a miss, not a crash)
            return None
        if not isinstance(found, str):
            return None
        return _normalise(found) if normalize else found

    def score(prompts, completions, **kwargs) -> list[float]:
        golds = _column(kwargs, answer_column, len(completions))
        out = []
        for completion, gold in zip(completions, golds):
            predicted, expected = answer_of(completion_text(completion)), answer_of(gold)
            out.append(reward if predicted is not None and expected is not None and predicted == expected else miss)
        return out

    return _named(score, name)


def numeric_answer_reward(answer_column: str = "answer", tolerance: float = 1e-6, *, relative: bool = False,
                          extract: Callable[[str], str | None] | None = extract_answer, reward: float = 1.0,
                          miss: float = 0.0, name: str = "numeric_answer_reward") -> RewardFunction:  # fmt: skip
    """`reward` when the number in the completion's extracted answer is within `tolerance` of the
    number in `answer_column`, else `miss`.

    The last number in the extracted text is used (`parse_number`: commas, currency signs, fractions,
    exponents). relative=True compares |pred - gold| <= tolerance * max(|gold|, 1e-12)."""
    tolerance = _check_number("tolerance", tolerance, 0.0)
    reward, miss = _check_number("reward", reward), _check_number("miss", miss)
    get = extract if extract is not None else (lambda text: text)

    def number_of(value) -> float | None:
        if isinstance(value, str):
            try:
                value = get(value)
            except Exception:  # noqa: BLE001 (see exact_answer_reward)
                return None
        return parse_number(value)

    def score(prompts, completions, **kwargs) -> list[float]:
        golds = _column(kwargs, answer_column, len(completions))
        out = []
        for completion, gold in zip(completions, golds):
            predicted, expected = number_of(completion_text(completion)), number_of(gold)
            if predicted is None or expected is None:
                out.append(miss)
                continue
            limit = tolerance * max(abs(expected), 1e-12) if relative else tolerance
            out.append(reward if abs(predicted - expected) <= limit else miss)
        return out

    return _named(score, name)


def length_reward(target: int, *, unit: str = "chars", tolerance: int = 0, scale: float | None = None,
                  only_longer: bool = False, miss: float = 0.0,
                  name: str = "length_reward") -> RewardFunction:  # fmt: skip
    """Length shaping: 1.0 within `tolerance` of `target`, falling linearly to 0.0 at `scale` beyond
    that (default scale: target), never below 0:

        reward = max(0, 1 - max(0, |length - target| - tolerance) / scale)

    unit: "chars", "words" (whitespace-separated) or "tokens" (the completion_ids TRL passes; without
    them the completion scores `miss`). only_longer=True does not punish being shorter than target
    (a length cap rather than a target)."""
    if unit not in ("chars", "words", "tokens"):
        raise ValueError(f"unit must be 'chars', 'words' or 'tokens', got {unit!r}")
    if isinstance(target, bool) or not isinstance(target, int) or target < 0:
        raise ValueError(f"target must be an int >= 0, got {target!r}")
    tolerance = _check_number("tolerance", tolerance, 0.0)
    scale = _check_number("scale", scale if scale is not None else max(target, 1), 0.0)
    if scale == 0:
        raise ValueError("scale must be > 0")
    miss = _check_number("miss", miss)

    def length_of(completion, ids) -> int | None:
        if unit == "tokens":
            return None if ids is None or isinstance(ids, str) or not hasattr(ids, "__len__") else len(ids)
        text = completion_text(completion)
        if text is None:
            return None
        return len(text) if unit == "chars" else len(text.split())

    def score(prompts, completions, **kwargs) -> list[float]:
        ids = _column(kwargs, "completion_ids", len(completions))
        out = []
        for completion, completion_ids in zip(completions, ids):
            length = length_of(completion, completion_ids)
            if length is None:
                out.append(miss)
                continue
            distance = length - target if only_longer else abs(length - target)
            out.append(max(0.0, 1.0 - max(0.0, distance - tolerance) / scale))
        return out

    return _named(score, name)


def combine_rewards(weighted: Sequence[tuple[RewardFunction, float]], *, name: str = "combined_reward"
                    ) -> RewardFunction:  # fmt: skip
    """One reward function: the weighted sum of several, each called with the same arguments.

    A part that raises or returns the wrong number of values contributes 0.0 to every completion (the
    others still count; a RuntimeWarning says so, once per part); a None or NaN value from a part
    counts 0.0 for that completion. (To log the parts separately instead, pass them to GRPOTrainer as
    a list with GRPOConfig.reward_weights.)"""
    parts = []
    for item in weighted:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and callable(item[0])):
            raise TypeError(f"combine_rewards takes (function, weight) pairs, got {item!r}")
        parts.append((item[0], _check_number("weight", item[1])))
    if not parts:
        raise ValueError("combine_rewards needs at least one (function, weight) pair")

    warned = set()

    def broken(function, why: str) -> None:
        if id(function) not in warned:  # once per part, not once per step
            warned.add(id(function))
            warnings.warn(f"combine_rewards: {getattr(function, '__name__', function)!r} {why}; it scores 0.0",
                          RuntimeWarning, stacklevel=3)  # fmt: skip

    def score(prompts, completions, **kwargs) -> list[float]:
        totals = [0.0] * len(completions)
        for function, weight in parts:
            try:
                values = list(function(prompts, completions, **kwargs))
            except Exception as error:  # noqa: BLE001 (one broken part must not stop training; it scores 0)
                broken(function, f"raised {type(error).__name__}: {error}")
                continue
            if len(values) != len(totals):
                broken(function, f"returned {len(values)} values for {len(totals)} completions")
                continue
            for i, value in enumerate(values):
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    totals[i] += weight * value
        return totals

    return _named(score, name)
