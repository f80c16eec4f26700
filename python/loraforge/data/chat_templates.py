"""get_chat_template: put a family's chat format (from the table in `templates`) on a tokenizer.

    tokenizer = get_chat_template(tokenizer, "llama-3.1")
    text = tokenizer.apply_chat_template(messages, tokenize=False)

ShareGPT data renders without converting it first:

    tokenizer = get_chat_template(
        tokenizer, "chatml", mapping={"role": "from", "content": "value", "user": "human", "assistant": "gpt"}
    )

`detect_chat_template` goes the other way: which table entry a tokenizer's template is (ours, or an
official one from a model repository), so response-only masking and export can find its markers.
"""

from __future__ import annotations

import json
import re
import warnings

from loraforge.data.templates import (
    CHAT_TEMPLATES,
    EOS_PLACEHOLDER,
    ChatTemplate,
    lookup_template,
)

__all__ = ["DEFAULT_MAPPING", "build_jinja", "detect_chat_template", "get_chat_template"]

DEFAULT_MAPPING = {"role": "role", "content": "content", "user": "user", "assistant": "assistant"}
# "system" is optional: ShareGPT data says "system" as well, so it defaults to itself.
_MAPPING_KEYS = ("role", "content", "user", "assistant", "system")
_IDENTITY_MAPPING = {**DEFAULT_MAPPING, "system": "system"}

# A Jinja comment at the top of every template we write. It renders to nothing, survives
# save_pretrained/from_pretrained, and tells detect_chat_template which entry made the template
# even after a mapping or system message changed its text.
_TAG = "loraforge chat template: "
_TAG_PATTERN = re.compile(r"\{#-?\s*" + re.escape(_TAG) + r"([\w.\-]+)")


def _jinja_string(value: str) -> str:
    # Jinja string literals take Python-style escapes; JSON's escapes are a subset of those.
    # ensure_ascii=False: Jinja decodes \uXXXX pairs for characters outside the BMP into two
    # lone surrogates, while a raw character goes through unchanged.
    return json.dumps(value, ensure_ascii=False)


def _validated_mapping(mapping) -> dict[str, str]:
    if mapping is None:
        return dict(_IDENTITY_MAPPING)
    if not isinstance(mapping, dict):
        raise TypeError(f"mapping must be a dict, got {type(mapping).__name__}")
    for key, value in mapping.items():
        if key not in _MAPPING_KEYS:
            raise ValueError(f"mapping has an unknown key {key!r}; valid keys: {', '.join(_MAPPING_KEYS)}")
        if not isinstance(value, str) or not value:
            raise ValueError(f"mapping[{key!r}] must be a non-empty string, got {value!r}")
    return {**_IDENTITY_MAPPING, **mapping}


def _mapping_prologue(mapping: dict[str, str]) -> str:
    """Jinja that rebuilds `messages` with role/content keys and user/assistant/system roles.

    Rewriting the data once, up front, instead of the body's every access keeps the bodies
    exactly the table's text. Roles not named in the mapping pass through unchanged.
    """
    if mapping == _IDENTITY_MAPPING:
        return ""
    role, content = _jinja_string(mapping["role"]), _jinja_string(mapping["content"])
    renames = "".join(
        f"{{%- {'if' if i == 0 else 'elif'} lf_role == {_jinja_string(mapping[ours])} %}}"
        f"{{%- set lf_role = '{ours}' %}}"
        for i, ours in enumerate(("user", "assistant", "system"))
    )
    return (
        "{%- set lf = namespace(messages=[]) %}"
        "{%- for lf_message in messages %}"
        f"{{%- set lf_role = lf_message[{role}] %}}"
        f"{renames}{{%- endif %}}"
        f"{{%- set lf.messages = lf.messages + [{{'role': lf_role, 'content': lf_message[{content}]}}] %}}"
        "{%- endfor %}"
        "{%- set messages = lf.messages %}"
    )


def build_jinja(
    template: ChatTemplate | str, mapping: dict[str, str] | None = None, system_message: str | None = None
) -> str:
    """The full Jinja text for a table entry (or entry name): tag, default system prompt, mapping
    prologue, body. `system_message` replaces the entry's default system prompt."""
    if isinstance(template, str):
        template = lookup_template(template)
    mapping = _validated_mapping(mapping)
    if system_message is None:
        system_message = template.default_system_message
    elif not isinstance(system_message, str):
        raise TypeError(f"system_message must be a string or None, got {type(system_message).__name__}")
    return (
        f"{{#- {_TAG}{template.name} #}}"
        f"{{%- set default_system_message = {_jinja_string(system_message)} %}}"
        + _mapping_prologue(mapping)
        + template.jinja.strip()
    )


def _add_missing_tokens(tokenizer, tokens, special: bool) -> list[str]:
    vocab = tokenizer.get_vocab()
    missing = [token for token in tokens if token not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=special)
    return missing


def _set_eos(tokenizer, token: str) -> bool:
    """Make `token` the eos token; True if it had to be added to the vocabulary."""
    added = token not in tokenizer.get_vocab()
    # add_special_tokens, not `tokenizer.eos_token = token`: the plain setter accepts a token the
    # vocabulary lacks and then maps it to unk.
    tokenizer.add_special_tokens({"eos_token": token})
    return added


def get_chat_template(
    tokenizer,
    chat_template: str | tuple[str, str] = "chatml",
    mapping: dict[str, str] | None = DEFAULT_MAPPING,
    map_eos_token: bool = True,
    system_message: str | None = None,
):
    """Give `tokenizer` a chat template from the table and return it (changed in place).

    chat_template: a table name or alias (see `templates.template_names`), a Jinja string of your
        own, or (jinja, stop_token) for your own template that ends replies with stop_token.
    mapping: the keys and role names your messages use, e.g. ShareGPT's
        {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}. Keys: role,
        content, user, assistant, system; missing ones mean themselves.
    map_eos_token: make the token that ends an assistant turn (e.g. <|im_end|>, <|eot_id|>) the
        tokenizer's eos_token, so generation stops where training taught the model to stop.
        Templates whose turns end with the tokenizer's own eos (mistral, zephyr, alpaca, vicuna)
        leave it as it is.
    system_message: replaces the template's default system prompt (used when a conversation has
        no system message); templates without a system role put it in the first user turn.

    Tokens the format needs that the vocabulary lacks are added (with a warning): resize the
    model's embeddings afterwards with model.resize_token_embeddings(len(tokenizer)).
    """
    mapping = _validated_mapping(mapping)  # before touching the tokenizer
    if isinstance(chat_template, tuple):
        if len(chat_template) != 2 or not all(isinstance(part, str) for part in chat_template):
            raise ValueError("a custom chat_template tuple must be (jinja_text, stop_token)")
        jinja, stop_token = chat_template
        return _apply_custom_template(tokenizer, jinja, stop_token, mapping, map_eos_token, system_message)
    if isinstance(chat_template, str) and ("{%" in chat_template or "{{" in chat_template):
        return _apply_custom_template(tokenizer, chat_template, None, mapping, map_eos_token, system_message)

    entry = lookup_template(chat_template)
    if entry.ends_with_eos and not tokenizer.eos_token:
        raise ValueError(f"chat template {entry.name!r} ends replies with eos_token, but the tokenizer has none")
    jinja = build_jinja(entry, mapping, system_message)

    added = _add_missing_tokens(tokenizer, entry.special_tokens, special=True)
    added += _add_missing_tokens(tokenizer, entry.plain_tokens, special=False)
    if map_eos_token and not entry.ends_with_eos and _set_eos(tokenizer, entry.end_of_turn):
        added.append(entry.end_of_turn)
    tokenizer.chat_template = jinja
    _warn_if_added(added, entry.name)
    return tokenizer


def _apply_custom_template(tokenizer, jinja, stop_token, mapping, map_eos_token, system_message):
    prologue = ""
    if system_message is not None:
        prologue += f"{{%- set default_system_message = {_jinja_string(system_message)} %}}"
    tokenizer.chat_template = prologue + _mapping_prologue(mapping) + jinja
    if stop_token and map_eos_token and _set_eos(tokenizer, stop_token):
        _warn_if_added([stop_token], "custom")
    return tokenizer


def _warn_if_added(added: list[str], name: str) -> None:
    if added:
        warnings.warn(
            f"get_chat_template({name!r}) added {len(added)} token(s) the tokenizer lacked: {added}. "
            "Resize the model's embeddings before training: model.resize_token_embeddings(len(tokenizer)).",
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------

# Probe conversations for templates we did not write. Some official templates reject a system
# message (Gemma 1/2), so try without one as well.
_PROBES = (
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "V"},
    ],
    [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}],
)


def _template_text(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one is the chat format
        template = template.get("default")
    return template if isinstance(template, str) else None


def detect_chat_template(tokenizer) -> ChatTemplate | None:
    """The table entry whose format `tokenizer.chat_template` produces, or None.

    Templates made by get_chat_template are recognised by their tag. Others (e.g. the one a model
    repository ships) are rendered on a probe conversation and matched by the entry whose user
    marker, assistant marker and end-of-turn token all appear, longest markers winning (so Phi-3
    beats Zephyr, which shares its role markers). Entries with identical markers (chatml, qwen-2.5,
    qwen-3) are interchangeable for masking; the first in the table is returned.
    """
    template = _template_text(tokenizer)
    if template is None:
        return None
    tagged = _TAG_PATTERN.search(template)
    if tagged and tagged.group(1) in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[tagged.group(1)]

    rendered = None
    for probe in _PROBES:
        try:
            rendered = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
            break
        except Exception:  # noqa: BLE001 - a foreign template may raise anything for a probe it dislikes
            continue
    if not isinstance(rendered, str):
        return None

    best, best_score = None, 0
    for entry in CHAT_TEMPLATES.values():
        end = entry.end_of_turn.replace(EOS_PLACEHOLDER, tokenizer.eos_token or "\0")
        parts = (entry.instruction_part, entry.response_part, end)
        if all(part in rendered for part in parts):
            score = sum(len(part) for part in parts)
            if score > best_score:
                best, best_score = entry, score
    return best
