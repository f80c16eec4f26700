"""Chat templates: reference renderings per family, tokenizer round trips, eos mapping, ShareGPT
mapping, detection, and agreement between the Jinja and the Ollama (Go) templates."""

import json
import re
import warnings

import pytest

from loraforge.data import (
    CHAT_TEMPLATES,
    build_jinja,
    detect_chat_template,
    get_chat_template,
    lookup_template,
    template_names,
)
from loraforge.testing import CHATML_TEMPLATE, build_tokenizer

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"  # the tiny tokenizer's

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
CONVERSATION = [
    SYSTEM,
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]
PROMPT = CONVERSATION[:4]  # ends with a user turn: what is sent for generation

# Reference renderings, written by hand from each family's published format:
# (whole conversation, add_generation_prompt=False), (PROMPT, add_generation_prompt=True).
_CHATML_PROMPT = (
    "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\nParis.<|im_end|>\n"
    "<|im_start|>user\nAnd of Italy?<|im_end|>\n"
)
_LLAMA3_TURNS = (
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nAnd of Italy?<|eot_id|>"
)
_LLAMA3_REPLY = "<|start_header_id|>assistant<|end_header_id|>\n\n"
_LLAMA3_SYSTEM = "<|start_header_id|>system<|end_header_id|>\n\n"
_LLAMA31_PREAMBLE = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
_GEMMA_PROMPT = (
    BOS + "<start_of_turn>user\nYou are a terse assistant.\n\nWhat is the capital of France?<end_of_turn>\n"
    "<start_of_turn>model\nParis.<end_of_turn>\n"
    "<start_of_turn>user\nAnd of Italy?<end_of_turn>\n"
)
_PHI3_PROMPT = (
    "<|system|>\nYou are a terse assistant.<|end|>\n<|user|>\nWhat is the capital of France?<|end|>\n"
    "<|assistant|>\nParis.<|end|>\n<|user|>\nAnd of Italy?<|end|>\n"
)
_ZEPHYR_PROMPT = (
    f"<|system|>\nYou are a terse assistant.{EOS}\n<|user|>\nWhat is the capital of France?{EOS}\n"
    f"<|assistant|>\nParis.{EOS}\n<|user|>\nAnd of Italy?{EOS}\n"
)
_ALPACA_PROMPT = (
    f"{BOS}You are a terse assistant.\n\n### Instruction:\nWhat is the capital of France?\n\n"
    f"### Response:\nParis.{EOS}\n\n### Instruction:\nAnd of Italy?\n\n"
)
_VICUNA_PROMPT = f"{BOS}You are a terse assistant. USER: What is the capital of France? ASSISTANT: Paris.{EOS}USER: And of Italy? "
_MISTRAL_PROMPT = f"{BOS}[INST] You are a terse assistant.\n\nWhat is the capital of France? [/INST] Paris.{EOS}[INST] And of Italy? [/INST]"

EXPECTED = {
    "chatml": (
        _CHATML_PROMPT + "<|im_start|>assistant\nRome.<|im_end|>\n",
        _CHATML_PROMPT + "<|im_start|>assistant\n",
    ),
    "qwen-2.5": (
        _CHATML_PROMPT + "<|im_start|>assistant\nRome.<|im_end|>\n",
        _CHATML_PROMPT + "<|im_start|>assistant\n",
    ),
    # The final reply (after the last user message) carries Qwen-3's empty think block.
    "qwen-3": (
        _CHATML_PROMPT + "<|im_start|>assistant\n<think>\n\n</think>\n\nRome.<|im_end|>\n",
        _CHATML_PROMPT + "<|im_start|>assistant\n",
    ),
    "llama-3": (
        BOS + _LLAMA3_SYSTEM + "You are a terse assistant.<|eot_id|>" + _LLAMA3_TURNS + _LLAMA3_REPLY + "Rome.<|eot_id|>",
        BOS + _LLAMA3_SYSTEM + "You are a terse assistant.<|eot_id|>" + _LLAMA3_TURNS + _LLAMA3_REPLY,
    ),
    "llama-3.1": (
        BOS + _LLAMA3_SYSTEM + _LLAMA31_PREAMBLE + "You are a terse assistant.<|eot_id|>" + _LLAMA3_TURNS
        + _LLAMA3_REPLY + "Rome.<|eot_id|>",
        BOS + _LLAMA3_SYSTEM + _LLAMA31_PREAMBLE + "You are a terse assistant.<|eot_id|>" + _LLAMA3_TURNS
        + _LLAMA3_REPLY,
    ),
    "mistral": (_MISTRAL_PROMPT + f" Rome.{EOS}", _MISTRAL_PROMPT),
    "gemma": (
        _GEMMA_PROMPT + "<start_of_turn>model\nRome.<end_of_turn>\n",
        _GEMMA_PROMPT + "<start_of_turn>model\n",
    ),
    "phi-3": (_PHI3_PROMPT + "<|assistant|>\nRome.<|end|>\n", _PHI3_PROMPT + "<|assistant|>\n"),
    "zephyr": (_ZEPHYR_PROMPT + f"<|assistant|>\nRome.{EOS}\n", _ZEPHYR_PROMPT + "<|assistant|>\n"),
    "alpaca": (_ALPACA_PROMPT + f"### Response:\nRome.{EOS}\n\n", _ALPACA_PROMPT + "### Response:\n"),
    "vicuna": (_VICUNA_PROMPT + f"ASSISTANT: Rome.{EOS}", _VICUNA_PROMPT + "ASSISTANT:"),
}


def templated_tokenizer(name, **kwargs):
    """A fresh tiny tokenizer with template `name` (token additions warn; expected here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return get_chat_template(build_tokenizer(), name, **kwargs)


def render(tokenizer, messages, **kwargs):
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def test_every_template_has_a_reference_rendering():
    assert set(EXPECTED) == set(template_names())


@pytest.mark.parametrize("name", template_names())
def test_reference_rendering(name):
    tokenizer = templated_tokenizer(name)
    full, prompt = EXPECTED[name]
    assert render(tokenizer, CONVERSATION) == full
    assert render(tokenizer, PROMPT, add_generation_prompt=True) == prompt


@pytest.mark.parametrize("name", template_names())
def test_round_trip_through_the_tiny_tokenizer(name):
    tokenizer = templated_tokenizer(name)
    entry = CHAT_TEMPLATES[name]
    text = render(tokenizer, CONVERSATION)
    ids = tokenizer.apply_chat_template(CONVERSATION, return_dict=True)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    for token in entry.special_tokens:  # each special token the format needs is one token
        assert ids.count(tokenizer.convert_tokens_to_ids(token)) == text.count(token) > 0
    assert ids.count(tokenizer.eos_token_id) >= 2  # every reply ends with the stop token


def test_defaults_and_system_message_override():
    no_system = CONVERSATION[1:3]
    qwen = templated_tokenizer("qwen-2.5")
    assert render(qwen, no_system).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
    )
    custom = templated_tokenizer("qwen-2.5", system_message='Be "brief".\nUse 🙂.')
    assert render(custom, no_system).startswith('<|im_start|>system\nBe "brief".\nUse 🙂.<|im_end|>\n')
    # An explicit system message still wins over the default.
    assert render(custom, CONVERSATION) == EXPECTED["qwen-2.5"][0]
    assert render(templated_tokenizer("chatml"), no_system).startswith("<|im_start|>user\n")
    assert render(templated_tokenizer("chatml", system_message="Hi."), no_system).startswith(
        "<|im_start|>system\nHi.<|im_end|>\n<|im_start|>user\n"
    )
    llama31 = render(templated_tokenizer("llama-3.1", system_message="Be kind."), no_system)
    assert llama31.startswith(BOS + _LLAMA3_SYSTEM + _LLAMA31_PREAMBLE + "Be kind.<|eot_id|><|start_header_id|>user")
    gemma = render(templated_tokenizer("gemma", system_message="Be kind."), no_system)
    assert gemma.startswith(BOS + "<start_of_turn>user\nBe kind.\n\nWhat is the capital")
    alpaca = render(templated_tokenizer("alpaca"), no_system)
    assert alpaca.startswith(BOS + "Below is an instruction that describes a task.")
    assert render(templated_tokenizer("alpaca", system_message=""), no_system).startswith(BOS + "### Instruction:\n")


def test_qwen3_thinking():
    tokenizer = templated_tokenizer("qwen-3")
    assert render(tokenizer, PROMPT, add_generation_prompt=True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    thought = [
        CONVERSATION[1],
        {"role": "assistant", "content": "<think>\nFrance.\n</think>\n\nParis."},
        CONVERSATION[3],
        {"role": "assistant", "content": "Rome.", "reasoning_content": "Italy."},
    ]
    assert render(tokenizer, thought) == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"  # reasoning before the last question is dropped
        "<|im_start|>user\nAnd of Italy?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nItaly.\n</think>\n\nRome.<|im_end|>\n"
    )


def test_system_message_in_the_middle_is_an_error_where_the_family_has_no_system_role():
    messages = [CONVERSATION[1], CONVERSATION[2], SYSTEM, CONVERSATION[3]]
    for name in ("gemma", "mistral", "alpaca", "vicuna"):
        with pytest.raises(Exception, match="system message may only come first"):
            render(templated_tokenizer(name), messages)


def test_names_aliases_and_errors():
    for alias, name in [("llama3", "llama-3"), ("Llama_3.1", "llama-3.1"), ("llama-3.2", "llama-3.1"),
                        ("qwen2.5", "qwen-2.5"), ("qwen3", "qwen-3"), ("gemma2", "gemma"), ("gemma-3", "gemma"),
                        ("phi-3.5", "phi-3"), ("CHATML", "chatml")]:
        assert lookup_template(alias).name == name
    with pytest.raises(ValueError, match=r"unknown chat template 'llama-9'.*chatml.*vicuna"):
        get_chat_template(build_tokenizer(), "llama-9")
    with pytest.raises(ValueError, match="'speaker'"):
        get_chat_template(build_tokenizer(), "chatml", mapping={"speaker": "from"})
    with pytest.raises(ValueError, match="'content'"):
        get_chat_template(build_tokenizer(), "chatml", mapping={"content": ""})


def test_map_eos_token():
    tokenizer = build_tokenizer()
    get_chat_template(tokenizer, "chatml")
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 4)

    tokenizer = build_tokenizer()
    size = len(tokenizer)
    with pytest.warns(UserWarning, match="resize_token_embeddings"):
        get_chat_template(tokenizer, "llama-3")
    assert tokenizer.eos_token == "<|eot_id|>" and len(tokenizer) == size + 3
    assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == "<|eot_id|>"

    tokenizer = build_tokenizer()
    with pytest.warns(UserWarning):
        get_chat_template(tokenizer, "gemma", map_eos_token=False)
    assert tokenizer.eos_token == EOS
    # Families that end replies with the tokenizer's own eos keep it.
    assert templated_tokenizer("mistral").eos_token == EOS

    tokenizer = build_tokenizer()
    get_chat_template(tokenizer, (CHATML_TEMPLATE, "<|im_end|>"))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template.endswith(CHATML_TEMPLATE)


SHAREGPT_MAPPING = {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}
SHAREGPT = [
    {"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
    for m in CONVERSATION
]


@pytest.mark.parametrize("name", template_names())
def test_sharegpt_mapping_renders_like_role_content(name):
    tokenizer = templated_tokenizer(name, mapping=SHAREGPT_MAPPING)
    assert render(tokenizer, SHAREGPT) == EXPECTED[name][0]
    assert render(tokenizer, SHAREGPT[:4], add_generation_prompt=True) == EXPECTED[name][1]


def test_detect_chat_template():
    for name in template_names():
        assert detect_chat_template(templated_tokenizer(name, mapping=SHAREGPT_MAPPING)).name == name
    # Templates we did not write are recognised by what they render.
    assert detect_chat_template(build_tokenizer()).response_part == "<|im_start|>assistant\n"
    official_llama3 = (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
        "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    )
    assert detect_chat_template(build_tokenizer(chat_template=official_llama3)).name.startswith("llama-3")
    assert detect_chat_template(build_tokenizer(chat_template=None)) is None


def test_build_jinja_is_the_template_text():
    tokenizer = templated_tokenizer("gemma")
    assert tokenizer.chat_template == build_jinja("gemma")


# --------------------------------------------------------------------------------------------
# Ollama: a tiny evaluator for the Go text/template subset the table uses: text, {{ .Field }},
# {{ $var }}, {{ $var := pipeline }} / {{ $var = pipeline }}, if / else if / else / end,
# range over a list, eq / ne / not / and / or, string literals, {{- and -}} trimming.
# --------------------------------------------------------------------------------------------

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.DOTALL)


def _lex(template):
    items, position, trim_next = [], 0, False
    for match in _ACTION.finditer(template):
        text = template[position : match.start()]
        text = text.lstrip() if trim_next else text
        items.append(("text", text.rstrip() if match.group(1) else text))
        items.append(("action", match.group(2)))
        trim_next, position = bool(match.group(3)), match.end()
    tail = template[position:]
    items.append(("text", tail.lstrip() if trim_next else tail))
    return items


def _parse(items, i=0):
    """(nodes, index of the end/else action that stopped this block)."""
    nodes = []
    while i < len(items):
        kind, body = items[i]
        if kind == "text":
            nodes.append(("text", body))
        elif body == "end" or body == "else" or body.startswith("else if "):
            return nodes, i
        elif body.startswith("if "):
            branches, condition = [], body[3:]
            while True:
                block, i = _parse(items, i + 1)
                branches.append((condition, block))
                if items[i][1] == "end":
                    break
                condition = items[i][1][len("else if ") :] if items[i][1] != "else" else None
            nodes.append(("if", branches))
        elif body.startswith("range "):
            block, i = _parse(items, i + 1)
            assert items[i][1] == "end"
            nodes.append(("range", body[6:], block))
        else:
            nodes.append(("action", body))
        i += 1
    return nodes, i


_FUNCTIONS = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "not": lambda a: not a,
    "and": lambda *args: all(args),
    "or": lambda *args: any(args),
}


def _evaluate(expression, dot, root, variables):
    def value(token):
        if token.startswith('"'):
            return json.loads(token)
        if token == ".":
            return dot
        if token.startswith("$."):
            return root[token[2:]]
        if token.startswith("."):
            return dot[token[1:]]
        return variables[token]

    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|\S+', expression)
    if tokens[0] in _FUNCTIONS:
        return _FUNCTIONS[tokens[0]](*map(value, tokens[1:]))
    assert len(tokens) == 1, expression
    return value(tokens[0])


def _execute(nodes, dot, root, variables, out):
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "if":
            for condition, block in node[1]:
                if condition is None or _evaluate(condition, dot, root, variables):
                    _execute(block, dot, root, variables, out)
                    break
        elif node[0] == "range":
            for item in _evaluate(node[1], dot, root, variables):
                _execute(node[2], item, root, variables, out)
        elif assignment := re.fullmatch(r"(\$\w+)\s*:?=\s*(.+)", node[1]):
            variables[assignment[1]] = _evaluate(assignment[2], dot, root, variables)
        else:
            out.append(str(_evaluate(node[1], dot, root, variables)))


def render_go_template(template, data):
    out = []
    _execute(_parse(_lex(template))[0], data, data, {}, out)
    return "".join(out)


def test_go_evaluator_on_known_cases():
    data = {"System": "S", "Messages": [{"Role": "user", "Content": "hi"}]}
    template = '{{- $s := .System }}A {{ range .Messages }}{{ if eq .Role "x" }}no{{ else if $s }}[{{ .Content }}]{{ $s = "" }}{{ else }}z{{ end }}{{ end }} -{{ $s }}-'
    assert render_go_template(template, data) == "A [hi] --"
    assert render_go_template("a  {{- .System -}}  b", data) == "aSb"


def ollama_render(entry, messages, eos):
    """What Ollama renders: it puts the Modelfile's SYSTEM (the template's default system prompt,
    which export writes there) in front of a conversation without one, and .System holds the
    conversation's system messages."""
    if entry.default_system_message and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": entry.default_system_message}, *messages]
    data = {
        "System": "\n\n".join(m["content"] for m in messages if m["role"] == "system"),
        "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
    }
    return render_go_template(entry.resolve(entry.ollama, eos), data)


@pytest.mark.parametrize("name", template_names())
def test_ollama_template_matches_jinja(name):
    tokenizer = templated_tokenizer(name)
    entry = CHAT_TEMPLATES[name]
    for messages in (PROMPT, PROMPT[1:]):
        jinja = render(tokenizer, messages, add_generation_prompt=True)
        # llama.cpp adds BOS itself, so Ollama templates do not write it.
        jinja = jinja.removeprefix(BOS)
        assert ollama_render(entry, messages, tokenizer.eos_token) == jinja
