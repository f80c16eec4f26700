"""Ollama Modelfiles for exported GGUF files.

    FROM ./my-model.Q4_K_M.gguf
    TEMPLATE \"\"\"{{- range .Messages }}<|im_start|>{{ .Role }} ...\"\"\"
    PARAMETER stop "<|im_end|>"
    PARAMETER temperature 0.7
    PARAMETER num_ctx 2048
    SYSTEM \"\"\"...\"\"\"

The chat format comes from loraforge's template table (data/templates.py): the tokenizer's chat
template is matched to a table entry (detect_chat_template), whose Ollama Go template, stop tokens
and default system prompt are written. A tokenizer whose template is not in the table gets a
Modelfile without TEMPLATE (Ollama then passes prompts through raw) and stops on its EOS token.
num_ctx is the context the model was fine-tuned with (max_seq_length), else its trained context.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

from loraforge.export.atomic import atomic_file

__all__ = ["modelfile_paths", "modelfile_text", "write_modelfiles"]

DEFAULT_TEMPERATURE = 0.7


def _triple_quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise ValueError(f'the {what} contains """, which an Ollama Modelfile cannot quote')
    return f'"""{text}"""'


def _quoted(text: str) -> str:
    # JSON string escapes (\" \\ \n) are the ones Ollama's Modelfile parser understands.
    return json.dumps(text, ensure_ascii=False)


# get_chat_template writes the (possibly user-given) default system prompt as a JSON string literal.
_SYSTEM_PROMPT = re.compile(r'\{%-?\s*set default_system_message = ("(?:[^"\\]|\\.)*")\s*-?%\}')


def _system_prompt(tokenizer, entry) -> str:
    """The template's default system prompt: the one get_chat_template(system_message=...) wrote
    into the tokenizer's template, else the table's."""
    template = getattr(tokenizer, "chat_template", None)
    match = _SYSTEM_PROMPT.search(template) if isinstance(template, str) else None
    if match:
        try:
            return json.loads(match.group(1))
        except ValueError:
            pass
    return entry.default_system_message


def _context_length(model) -> int | None:
    from loraforge.export.merged_weights import transformer_of

    transformer = transformer_of(model)
    trained = getattr(transformer, "max_seq_length", None) or getattr(model, "max_seq_length", None)
    return int(trained or getattr(transformer.config, "max_position_embeddings", 0)) or None


def _sampling_parameters(model) -> dict[str, float]:
    """The model's own sampling defaults when its generation config samples, else a temperature."""
    from loraforge.export.merged_weights import transformer_of

    generation = getattr(transformer_of(model), "generation_config", None)
    if generation is not None and getattr(generation, "do_sample", False):
        params = {}
        for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            value = getattr(generation, key, None)
            if value is not None:
                params["repeat_penalty" if key == "repetition_penalty" else key] = value
        if params:
            return params
    return {"temperature": DEFAULT_TEMPERATURE}


def modelfile_text(model, tokenizer, gguf_file_name: str) -> str:
    """The Modelfile for `gguf_file_name` (a file in the same folder)."""
    from loraforge.data.chat_templates import detect_chat_template

    lines = [f"FROM ./{gguf_file_name}"]
    eos = getattr(tokenizer, "eos_token", None)
    entry = detect_chat_template(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    if entry is not None:
        lines.append(f"TEMPLATE {_triple_quoted(entry.resolve(entry.ollama, eos), 'chat template')}")
        stops = [entry.resolve(stop, eos) for stop in entry.stop_tokens]
    else:
        if getattr(tokenizer, "chat_template", None):
            warnings.warn(
                "the tokenizer's chat template is not one loraforge knows; the Modelfile has no TEMPLATE, so "
                "Ollama passes prompts through as they are. Set one with get_chat_template() before exporting.",
                stacklevel=3,
            )
        stops = [eos] if eos else []
    for stop in dict.fromkeys(stops):  # in order, once each
        lines.append(f"PARAMETER stop {_quoted(stop)}")
    for key, value in _sampling_parameters(model).items():
        lines.append(f"PARAMETER {key} {value}")
    context = _context_length(model)
    if context:
        lines.append(f"PARAMETER num_ctx {context}")
    system = _system_prompt(tokenizer, entry) if entry is not None else ""
    if system:
        lines.append(f"SYSTEM {_triple_quoted(system, 'system prompt')}")
    return "\n".join(lines) + "\n"


def modelfile_paths(gguf_paths: list) -> list[tuple[Path, str]]:
    """(Modelfile path, GGUF file name it points at): `<file>.Modelfile` next to each GGUF, and
    `Modelfile` (what `ollama create` reads by default) for the first one."""
    targets = [(Path(p).with_suffix(".Modelfile"), Path(p).name) for p in gguf_paths]
    if gguf_paths:
        targets.append((Path(gguf_paths[0]).parent / "Modelfile", Path(gguf_paths[0]).name))
    return targets


def write_modelfiles(model, tokenizer, gguf_paths: list, overwrite: bool = False) -> list[str]:
    """Write the Modelfiles of `modelfile_paths`; returns their paths."""
    written = []
    for target, gguf_name in modelfile_paths(gguf_paths):
        text = modelfile_text(model, tokenizer, gguf_name)
        with atomic_file(target, overwrite) as temporary:
            Path(temporary).write_text(text, encoding="utf-8")
        written.append(os.fspath(target))
    return written
