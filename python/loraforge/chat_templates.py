"""Unsloth-compatible module path: `from loraforge.chat_templates import get_chat_template, ...`."""

from loraforge.data import (  # noqa: F401
    get_chat_template,
    standardize_sharegpt,
    train_on_responses_only,
)
