"""Warn, before training starts, about a chat template that does not fit the model.

Two mistakes train without error and only show at inference:

* a template of another model family (a Llama-3 template on a Qwen2 model): the model learns a format
  its tokenizer, server and Modelfile do not expect;
* a template whose end-of-turn token (e.g. ``<|im_end|>``) is not among the ids generation stops on
  (``generation_config.eos_token_id`` or ``tokenizer.eos_token_id``): the model learns to end its
  replies with a token that does not stop it, and rambles on.

The checks are conservative: a template is judged only when `detect_chat_template` recognises it as
one of the table's entries, and a family mismatch only when that entry belongs to one family (ChatML,
Zephyr, Alpaca and Vicuna are used by every family and never warn) and the config's model_type is one
we know to be of another family.
"""

from __future__ import annotations

import warnings

from loraforge.data.chat_templates import detect_chat_template

__all__ = ["chat_template_problems", "warn_on_chat_template_problems"]

# Table entries that belong to one model family. Entries not listed are generic formats.
TEMPLATE_FAMILY = {"llama-3": "llama", "llama-3.1": "llama", "qwen-2.5": "qwen", "qwen-3": "qwen",
                   "mistral": "mistral", "gemma": "gemma", "phi-3": "phi"}  # fmt: skip
# transformers model_type -> family, for the model types we are sure of.
MODEL_FAMILY = {
    "llama": "llama", "qwen2": "qwen", "qwen2_moe": "qwen", "qwen3": "qwen", "qwen3_moe": "qwen",
    "mistral": "mistral", "mixtral": "mistral", "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma",
    "gemma3_text": "gemma", "phi3": "phi",
}  # fmt: skip
# (model family, template family) pairs that are not mistakes: Llama 2 chat models (model_type
# "llama") use the [INST] format of the mistral entry.
COMPATIBLE = {("llama", "mistral")}


def _ids(value) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value if v is not None}


def chat_template_problems(model, tokenizer) -> list[str]:
    """Messages for what is wrong between `model`'s family / stop ids and `tokenizer`'s chat template
    (empty when nothing is, or when the template is not one we recognise)."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's tokenizer
    entry = detect_chat_template(tokenizer)
    if entry is None:
        return []
    problems = []
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    model_family, template_family = MODEL_FAMILY.get(model_type), TEMPLATE_FAMILY.get(entry.name)
    mismatch = model_family and template_family and model_family != template_family
    if mismatch and (model_family, template_family) not in COMPATIBLE:
        problems.append(f"the tokenizer's chat template is {entry.name!r} (a {template_family} format) but the "
                        f"model is model_type={model_type!r} ({model_family}); pick the {model_family} family's "
                        "template with get_chat_template (or --chat-template), or a generic one such as chatml")  # fmt: skip

    end = entry.resolve(entry.end_of_turn, tokenizer.eos_token) if tokenizer.eos_token else entry.end_of_turn
    end_id = tokenizer.convert_tokens_to_ids(end) if end in tokenizer.get_vocab() else None
    generation_config = getattr(model, "generation_config", None)
    stop_ids = _ids(getattr(generation_config, "eos_token_id", None)) | _ids(tokenizer.eos_token_id)
    if end_id is not None and stop_ids and end_id not in stop_ids:
        problems.append(f"the {entry.name!r} chat template ends each reply with {end!r} (id {end_id}), but generation "
                        f"stops only on ids {sorted(stop_ids)} (generation_config.eos_token_id, "
                        "tokenizer.eos_token_id): the trained model would not stop after its reply. Use "
                        "get_chat_template(..., map_eos_token=True) or add the id to "
                        "model.generation_config.eos_token_id")  # fmt: skip
    return problems


def warn_on_chat_template_problems(model, tokenizer, stacklevel: int = 2) -> list[str]:
    """`chat_template_problems`, each as a UserWarning; returns them. Never raises: a check that
    cannot run (an odd tokenizer) must not stop a training run."""
    try:
        problems = chat_template_problems(model, tokenizer)
    except Exception:  # noqa: BLE001 - a courtesy check; never fail a run over it
        return []
    for problem in problems:
        warnings.warn(f"chat template: {problem}", UserWarning, stacklevel=stacklevel + 1)
    return problems
