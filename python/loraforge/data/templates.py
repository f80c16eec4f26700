"""The chat template table: one entry per model family, everything about its format in one place.

Each `ChatTemplate` carries the Jinja text that transformers' ``apply_chat_template`` renders, the
strings that begin a user turn and an assistant turn (response-only masking looks for them), the
token that ends an assistant turn, the stop strings for generation, and the Ollama (Go template)
version of the same format. Training, generation and export all read from this one entry, so they
cannot drift apart.

How the Jinja bodies are written:

* They read ``message['role']`` / ``message['content']`` with roles ``system``/``user``/
  ``assistant``. `chat_templates.build_jinja` puts a prologue in front that renames ShareGPT-style
  keys (``from``/``value``, ``human``/``gpt``) into that form, so the bodies never change.
* ``default_system_message`` is a Jinja variable set by that prologue from the table (or from the
  caller's ``system_message``); a body uses it when a conversation has no system message of its own.
* Every tag trims the whitespace around it (``{%-``/``{{-``), so the source can be laid out for
  reading and all output comes from explicit string literals.
* The assistant's reply and the token that ends it sit inside ``{% generation %}`` so
  ``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks exactly the tokens a model
  should learn to produce, the same ones `response_only.mask_non_responses` keeps.
* Where a family's tokenizer relies on a BOS token the template writes ``bos_token`` itself (as the
  official Llama-3, Mistral and Gemma templates do), so tokenize the rendered text with
  ``add_special_tokens=False``, which ``apply_chat_template(tokenize=True)`` already does.

Ollama templates are rendered by Ollama after it has put the Modelfile's SYSTEM prompt in front of
a conversation that has none, and llama.cpp adds BOS itself, so they neither hold the default system
prompt nor BOS. `EOS_PLACEHOLDER` stands for the tokenizer's EOS string in templates whose turns end
with it; `ChatTemplate.resolve` fills it in.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CHAT_TEMPLATES", "EOS_PLACEHOLDER", "ChatTemplate", "lookup_template", "template_names"]

# Stands for "the tokenizer's own eos_token" in end_of_turn, stop_tokens and ollama. Single braces
# are plain text to Go templates, and the table never renders it through str.format.
EOS_PLACEHOLDER = "{EOS}"


@dataclass(frozen=True)
class ChatTemplate:
    """One model family's chat format (see the module docstring)."""

    name: str
    jinja: str  # body only; chat_templates.build_jinja adds the prologue
    instruction_part: str  # text that begins a user turn
    response_part: str  # text that begins an assistant turn: the tail of the generation prompt
    end_of_turn: str  # token that ends an assistant turn (EOS_PLACEHOLDER: the tokenizer's eos)
    stop_tokens: tuple[str, ...]  # strings that end generation (Ollama PARAMETER stop, eos ids)
    ollama: str  # Go template for an Ollama Modelfile's TEMPLATE
    special_tokens: tuple[str, ...] = ()  # single special tokens the format needs
    plain_tokens: tuple[str, ...] = ()  # single tokens that are not special (kept on decode)
    default_system_message: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def ends_with_eos(self) -> bool:
        return self.end_of_turn == EOS_PLACEHOLDER

    def resolve(self, text: str, eos_token: str | None) -> str:
        """`text` (end_of_turn, a stop token, the Ollama template) with the EOS placeholder filled."""
        if EOS_PLACEHOLDER not in text:
            return text
        if not eos_token:
            raise ValueError(f"chat template {self.name!r} ends turns with EOS, but the tokenizer has no eos_token")
        return text.replace(EOS_PLACEHOLDER, eos_token)


# --------------------------------------------------------------------------------------------
# Jinja bodies. Raw strings: '\n' inside a Jinja string literal is Jinja's escape, not Python's.
# --------------------------------------------------------------------------------------------

_BOS = r"{%- if bos_token %}{{- bos_token }}{%- endif %}"

# A system turn from the table when the conversation brings none; `header` and `end` are the
# family's system-turn framing.
def _default_system_turn(header: str, end: str) -> str:
    return (
        r"{%- if messages and messages[0]['role'] != 'system' and default_system_message %}"
        r"{{- '" + header + r"' + default_system_message + " + end + r" }}"
        r"{%- endif %}"
    )


# ChatML (also Qwen-2.5, whose official template is ChatML with a default system prompt).
_CHATML = (
    _default_system_turn(r"<|im_start|>system\n", r"'<|im_end|>\n'")
    + r"""
{%- for message in messages %}
  {%- if message['role'] == 'assistant' %}
    {{- '<|im_start|>assistant\n' }}
    {%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}
    {{- '\n' }}
  {%- else %}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""
)

# Qwen-3: ChatML plus its <think> handling. As in the official template, replies before the last
# user message lose their reasoning, and replies after it carry a think block, an empty one for the
# final reply, which is how Qwen-3 marks non-thinking answers. The generation prompt opens an empty
# think block only when enable_thinking=False is passed (thinking is the family's default).
_QWEN3 = (
    _default_system_turn(r"<|im_start|>system\n", r"'<|im_end|>\n'")
    + r"""
{%- set ns = namespace(last_query=-1) %}
{%- for message in messages %}
  {%- if message['role'] == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
  {%- if message['role'] == 'assistant' %}
    {%- set content = message['content'] %}
    {%- set reasoning = '' %}
    {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
      {%- set reasoning = message.reasoning_content %}
    {%- elif '</think>' in content %}
      {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
      {%- set content = content.split('</think>')[-1].lstrip('\n') %}
    {%- endif %}
    {{- '<|im_start|>assistant\n' }}
    {%- generation %}
      {%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}
        {{- '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
      {%- else %}
        {{- content }}
      {%- endif %}
      {{- '<|im_end|>' }}
    {%- endgeneration %}
    {{- '\n' }}
  {%- else %}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
  {{- '<|im_start|>assistant\n' }}
  {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}
"""
)

# Llama 3 / 3.0: contents are trimmed, as in Meta's template.
_LLAMA3_TURNS = r"""
  {%- if message['role'] == 'assistant' %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
    {%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}
  {%- else %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
  {%- endif %}
"""
_LLAMA3_GENERATION_PROMPT = (
    r"{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
_LLAMA3 = (
    _BOS
    + _default_system_turn(r"<|start_header_id|>system<|end_header_id|>\n\n", r"'<|eot_id|>'")
    + r"{%- for message in messages %}"
    + _LLAMA3_TURNS
    + r"{%- endfor %}"
    + _LLAMA3_GENERATION_PROMPT
)

# Llama 3.1 (also 3.2/3.3 without tools): the system block is always there and starts with the
# knowledge-cutoff lines; date_string can be passed to apply_chat_template as in Meta's template.
_LLAMA31 = (
    _BOS
    + r"""
{%- if messages and messages[0]['role'] == 'system' %}
  {%- set system_message = messages[0]['content'] | trim %}
  {%- set loop_messages = messages[1:] %}
{%- else %}
  {%- set system_message = default_system_message %}
  {%- set loop_messages = messages %}
{%- endif %}
{%- if date_string is not defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}
{{- 'Cutting Knowledge Date: December 2023\nToday Date: ' + date_string + '\n\n' }}
{{- system_message + '<|eot_id|>' }}
{%- for message in loop_messages %}"""
    + _LLAMA3_TURNS
    + r"{%- endfor %}"
    + _LLAMA3_GENERATION_PROMPT
)

# Families with no system role: the first system message (or the default) is held in ns.system
# and put in front of the first user message, then cleared. A system message anywhere else is an
# error rather than silently dropped.
_SPLIT_SYSTEM = r"""
{%- if messages and messages[0]['role'] == 'system' %}
  {%- set ns = namespace(system=messages[0]['content']) %}
  {%- set loop_messages = messages[1:] %}
{%- else %}
  {%- set ns = namespace(system=default_system_message) %}
  {%- set loop_messages = messages %}
{%- endif %}
"""


def _system_only_first(family: str) -> str:
    return (
        r"{{- raise_exception('" + family + r": a system message may only come first, and roles "
        r"other than system/user/assistant are not supported') }}"
    )


# Mistral v1-style instruct format (7B v0.1/v0.2, Mixtral): "[INST] ... [/INST] reply</s>". Mistral's
# own templates disagree between releases on where a system prompt goes (first or last user turn);
# the first user turn keeps it in place as a conversation grows, which multi-turn training wants.
# The reply is preceded by a space, which the model generates after "[/INST]".
_MISTRAL = (
    _BOS
    + _SPLIT_SYSTEM
    + r"""
{%- for message in loop_messages %}
  {%- if message['role'] == 'user' %}
    {{- '[INST] ' }}
    {%- if ns.system %}{{- ns.system + '\n\n' }}{%- set ns.system = '' %}{%- endif %}
    {{- message['content'] + ' [/INST]' }}
  {%- elif message['role'] == 'assistant' %}
    {%- generation %}{{- ' ' + message['content'] + eos_token }}{%- endgeneration %}
  {%- else %}"""
    + _system_only_first("mistral")
    + r"""
  {%- endif %}
{%- endfor %}
"""
)

# Gemma / Gemma 2 / Gemma 3: the assistant role is called "model"; contents are trimmed. Gemma has
# no system role, so the system prompt opens the first user turn, as Gemma 3's template does.
_GEMMA = (
    _BOS
    + _SPLIT_SYSTEM
    + r"""
{%- for message in loop_messages %}
  {%- if message['role'] == 'user' %}
    {{- '<start_of_turn>user\n' }}
    {%- if ns.system %}{{- ns.system | trim + '\n\n' }}{%- set ns.system = '' %}{%- endif %}
    {{- message['content'] | trim + '<end_of_turn>\n' }}
  {%- elif message['role'] == 'assistant' %}
    {{- '<start_of_turn>model\n' }}
    {%- generation %}{{- message['content'] | trim + '<end_of_turn>' }}{%- endgeneration %}
    {{- '\n' }}
  {%- else %}"""
    + _system_only_first("gemma")
    + r"""
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}
"""
)


def _pipe_role_body(family: str, end: str) -> str:
    """Phi-3 and Zephyr: "<|role|>\\n content END \\n"; they differ only in END."""
    return (
        _default_system_turn(r"<|system|>\n", end + r" + '\n'")
        + r"""
{%- for message in messages %}
  {%- if message['role'] == 'assistant' %}
    {{- '<|assistant|>\n' }}
    {%- generation %}{{- message['content'] + """
        + end
        + r""" }}{%- endgeneration %}
    {{- '\n' }}
  {%- elif message['role'] in ['system', 'user'] %}
    {{- '<|' + message['role'] + '|>\n' + message['content'] + """
        + end
        + r""" + '\n' }}
  {%- else %}
    {{- raise_exception('"""
        + family
        + r""": only system, user and assistant messages are supported') }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}
"""
    )


# Phi-3 / 3.5. The official template also appends eos_token after the last turn when no generation
# prompt is asked for; it is left out: every reply already ends with <|end|>, the stop token, and
# once map_eos_token makes <|end|> the eos it would only repeat it.
_PHI3 = _pipe_role_body("phi-3", r"'<|end|>'")
# Zephyr: turns end with the tokenizer's eos; <|user|> etc. are plain text in its tokenizer.
_ZEPHYR = _pipe_role_body("zephyr", r"eos_token")


def _system_first_then(system_suffix: str, turns: str, generation_prompt: str, family: str) -> str:
    """Formats that print the system prompt once as a preamble: Alpaca and Vicuna.

    `turns` is the start of an if/elif chain over message['role']; this closes it.
    """
    return (
        _BOS
        + _SPLIT_SYSTEM
        + r"{%- if ns.system %}{{- ns.system + '"
        + system_suffix
        + r"' }}{%- endif %}"
        + r"{%- for message in loop_messages %}"
        + turns
        + r"{%- else %}"
        + _system_only_first(family)
        + r"{%- endif %}{%- endfor %}"
        + r"{%- if add_generation_prompt %}{{- '"
        + generation_prompt
        + r"' }}{%- endif %}"
    )


# Alpaca (Stanford): a system preamble, then "### Instruction:" / "### Response:" blocks. Alpaca
# and Vicuna were trained on LLaMA, whose tokenizer put BOS in front of every prompt; the templates
# write it, since apply_chat_template does not add it.
_ALPACA = _system_first_then(
    r"\n\n",
    r"""
  {%- if message['role'] == 'user' %}{{- '### Instruction:\n' + message['content'] + '\n\n' }}
  {%- elif message['role'] == 'assistant' %}
    {{- '### Response:\n' }}
    {%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}
    {{- '\n\n' }}""",
    r"### Response:\n",
    "alpaca",
)

# Vicuna v1.1 (FastChat): "SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT:".
_VICUNA = _system_first_then(
    " ",
    r"""
  {%- if message['role'] == 'user' %}{{- 'USER: ' + message['content'] + ' ' }}
  {%- elif message['role'] == 'assistant' %}
    {{- 'ASSISTANT:' }}
    {%- generation %}{{- ' ' + message['content'] + eos_token }}{%- endgeneration %}""",
    r"ASSISTANT:",
    "vicuna",
)


# --------------------------------------------------------------------------------------------
# Ollama templates (Go text/template). Plain strings with explicit newlines: every character
# outside {{ }} is output.
# --------------------------------------------------------------------------------------------

_OLLAMA_CHATML = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)
_OLLAMA_LLAMA3 = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
    "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
# .System is every system message of the conversation; Jinja puts the first one in the system
# block. They agree for the usual conversation with one system message at the top.
_OLLAMA_LLAMA31 = (
    "<|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    "{{ if .System }}{{ .System }}{{ end }}<|eot_id|>"
    '{{- range .Messages }}{{ if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
    "{{ .Content }}<|eot_id|>{{ end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
# $system is printed in front of the first user message, then cleared.
_OLLAMA_MISTRAL = (
    '{{- $system := .System }}{{ range .Messages }}{{ if eq .Role "user" }}[INST] '
    '{{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}{{ .Content }} [/INST]'
    '{{ else if eq .Role "assistant" }} {{ .Content }}' + EOS_PLACEHOLDER + "{{ end }}{{ end }}"
)
_OLLAMA_GEMMA = (
    '{{- $system := .System }}{{ range .Messages }}{{ if eq .Role "user" }}<start_of_turn>user\n'
    '{{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>\n'
    '{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n'
    "{{ end }}{{ end }}<start_of_turn>model\n"
)
_OLLAMA_PHI3 = "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n"
_OLLAMA_ZEPHYR = (
    "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}" + EOS_PLACEHOLDER + "\n{{ end }}<|assistant|>\n"
)
_OLLAMA_ALPACA = (
    "{{- if .System }}{{ .System }}\n\n{{ end }}"
    '{{ range .Messages }}{{ if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
    '{{ else if eq .Role "assistant" }}### Response:\n{{ .Content }}' + EOS_PLACEHOLDER + "\n\n"
    "{{ end }}{{ end }}### Response:\n"
)
_OLLAMA_VICUNA = (
    "{{- if .System }}{{ .System }} {{ end }}"
    '{{ range .Messages }}{{ if eq .Role "user" }}USER: {{ .Content }} '
    '{{ else if eq .Role "assistant" }}ASSISTANT: {{ .Content }}' + EOS_PLACEHOLDER + "{{ end }}{{ end }}ASSISTANT:"
)


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

_CHATML_MARKERS = dict(
    instruction_part="<|im_start|>user\n",
    response_part="<|im_start|>assistant\n",
    end_of_turn="<|im_end|>",
    stop_tokens=("<|im_end|>", "<|im_start|>"),
    ollama=_OLLAMA_CHATML,
    special_tokens=("<|im_start|>", "<|im_end|>"),
)
_LLAMA3_MARKERS = dict(
    instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
    response_part="<|start_header_id|>assistant<|end_header_id|>\n\n",
    end_of_turn="<|eot_id|>",
    stop_tokens=("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
    special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
)
_PIPE_MARKERS = dict(instruction_part="<|user|>\n", response_part="<|assistant|>\n")

_ENTRIES = (
    ChatTemplate(name="chatml", jinja=_CHATML, **_CHATML_MARKERS, aliases=("chat-ml", "openhermes")),
    ChatTemplate(
        name="qwen-2.5",
        jinja=_CHATML,
        **_CHATML_MARKERS,
        default_system_message="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        aliases=("qwen2.5", "qwen25", "qwen-25", "qwen2-5", "qwen-2-5"),
    ),
    ChatTemplate(
        name="qwen-3",
        jinja=_QWEN3,
        **_CHATML_MARKERS,
        plain_tokens=("<think>", "</think>"),
        aliases=("qwen3", "qwen-3-instruct"),
    ),
    ChatTemplate(name="llama-3", jinja=_LLAMA3, ollama=_OLLAMA_LLAMA3, **_LLAMA3_MARKERS, aliases=("llama3", "llama-3.0")),
    ChatTemplate(
        name="llama-3.1",
        jinja=_LLAMA31,
        ollama=_OLLAMA_LLAMA31,
        **_LLAMA3_MARKERS,
        aliases=("llama3.1", "llama-31", "llama31", "llama-3.2", "llama3.2", "llama-32", "llama-3.3", "llama3.3", "llama-33"),
    ),
    ChatTemplate(
        name="mistral",
        jinja=_MISTRAL,
        instruction_part="[INST]",
        response_part="[/INST]",
        end_of_turn=EOS_PLACEHOLDER,
        stop_tokens=(EOS_PLACEHOLDER, "[INST]"),
        ollama=_OLLAMA_MISTRAL,
        aliases=("mixtral", "mistral-instruct"),
    ),
    ChatTemplate(
        name="gemma",
        jinja=_GEMMA,
        instruction_part="<start_of_turn>user\n",
        response_part="<start_of_turn>model\n",
        end_of_turn="<end_of_turn>",
        stop_tokens=("<end_of_turn>", "<start_of_turn>"),
        ollama=_OLLAMA_GEMMA,
        special_tokens=("<start_of_turn>", "<end_of_turn>"),
        # Gemma, Gemma 2 and Gemma 3 share this text format.
        aliases=("gemma2", "gemma-2", "gemma3", "gemma-3", "gemma-it"),
    ),
    ChatTemplate(
        name="phi-3",
        jinja=_PHI3,
        **_PIPE_MARKERS,
        end_of_turn="<|end|>",
        stop_tokens=("<|end|>", "<|user|>", "<|assistant|>"),
        ollama=_OLLAMA_PHI3,
        special_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        aliases=("phi3", "phi-3.5", "phi3.5", "phi-35", "phi35"),
    ),
    ChatTemplate(
        name="zephyr",
        jinja=_ZEPHYR,
        **_PIPE_MARKERS,
        end_of_turn=EOS_PLACEHOLDER,
        stop_tokens=(EOS_PLACEHOLDER, "<|user|>"),
        ollama=_OLLAMA_ZEPHYR,
    ),
    ChatTemplate(
        name="alpaca",
        jinja=_ALPACA,
        instruction_part="### Instruction:\n",
        response_part="### Response:\n",
        end_of_turn=EOS_PLACEHOLDER,
        stop_tokens=(EOS_PLACEHOLDER, "### Instruction:"),
        ollama=_OLLAMA_ALPACA,
        default_system_message=(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        ),
    ),
    ChatTemplate(
        name="vicuna",
        jinja=_VICUNA,
        instruction_part="USER:",
        response_part="ASSISTANT:",
        end_of_turn=EOS_PLACEHOLDER,
        stop_tokens=(EOS_PLACEHOLDER, "USER:"),
        ollama=_OLLAMA_VICUNA,
        default_system_message=(
            "A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions."
        ),
        aliases=("vicuna-1.1", "vicuna_v1.1"),
    ),
)

CHAT_TEMPLATES: dict[str, ChatTemplate] = {entry.name: entry for entry in _ENTRIES}


def _normalise(name: str) -> str:
    # "Llama_3.1", " llama-3.1 " and "LLAMA-3.1" all mean the same template.
    return name.strip().lower().replace("_", "-")


_BY_NAME: dict[str, ChatTemplate] = {}
for _entry in _ENTRIES:
    for _name in (_entry.name, *_entry.aliases):
        assert _normalise(_name) not in _BY_NAME, f"template name {_name!r} used twice"
        _BY_NAME[_normalise(_name)] = _entry
del _entry, _name


def template_names(with_aliases: bool = False) -> list[str]:
    """Names get_chat_template accepts (canonical names, and their aliases if asked)."""
    if with_aliases:
        return sorted(_BY_NAME)
    return list(CHAT_TEMPLATES)


def lookup_template(name: str) -> ChatTemplate:
    """The table entry for `name` or one of its aliases; ValueError listing valid names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"chat template name must be a string, got {type(name).__name__}")
    entry = _BY_NAME.get(_normalise(name))
    if entry is None:
        raise ValueError(
            f"unknown chat template {name!r}; valid names: {', '.join(template_names())} "
            f"(aliases: {', '.join(n for n in template_names(True) if n not in CHAT_TEMPLATES)})"
        )
    return entry
