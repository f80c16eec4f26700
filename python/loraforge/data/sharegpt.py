"""standardize_sharegpt: ShareGPT conversations -> the role/content messages chat templates read.

ShareGPT-style datasets store each conversation as [{"from": "human", "value": "..."}, ...] with
role names that vary between sources (human, gpt, chatgpt, bing, model, ...). Chat templates and
TRL expect [{"role": "user", "content": "..."}]. This rewrites the one into the other and stops at
the first role it does not know, naming the role and the row, rather than guessing.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ROLE_ALIASES", "standardize_sharegpt"]

# Role names seen in public ShareGPT-format datasets -> the standard role.
ROLE_ALIASES: dict[str, str] = {
    **dict.fromkeys(("system", "sys", "instruction_system"), "system"),
    **dict.fromkeys(("human", "user", "prompter", "person", "question", "instruction"), "user"),
    **dict.fromkeys(
        ("gpt", "assistant", "chatgpt", "bing", "bard", "model", "bot", "claude", "llm", "answer", "output"),
        "assistant",
    ),
    **dict.fromkeys(("tool", "function", "function_response", "observation", "ipython"), "tool"),
}

# Message keys, in the order they are tried: ShareGPT's, then the already-standard ones.
_ROLE_KEYS = ("from", "role")
_CONTENT_KEYS = ("value", "content")


def _role_table(aliases_for_system, aliases_for_user, aliases_for_assistant) -> dict[str, str]:
    table = dict(ROLE_ALIASES)
    for role, names in (("system", aliases_for_system), ("user", aliases_for_user), ("assistant", aliases_for_assistant)):
        if names is None:
            continue
        if isinstance(names, str):
            names = [names]
        for name in names:
            table[str(name).lower()] = role
    return table


def _standard_message(message, roles: dict[str, str], row: int, column: str) -> dict[str, str]:
    if not isinstance(message, dict):
        raise ValueError(f"row {row}: {column!r} must hold dicts, got {type(message).__name__}")
    role_key = next((key for key in _ROLE_KEYS if message.get(key) is not None), None)
    # Arrow gives every message the union of keys seen in the column (missing ones as None), so
    # prefer a key that holds a value, then any that is present (an empty message stays empty).
    content_key = next(
        (key for key in _CONTENT_KEYS if message.get(key) is not None),
        next((key for key in _CONTENT_KEYS if key in message), None),
    )
    if role_key is None or content_key is None:
        raise ValueError(
            f"row {row}: a message needs a role ('from' or 'role') and a text ('value' or 'content'); "
            f"got keys {sorted(message)}"
        )
    name = message[role_key]
    role = roles.get(str(name).strip().lower())
    if role is None:
        raise ValueError(
            f"row {row}: unknown role {name!r} in {column!r}; known roles: {', '.join(sorted(roles))}. "
            "Pass aliases_for_user / aliases_for_assistant / aliases_for_system to add it."
        )
    return {"role": role, "content": message[content_key]}


def _standard_conversation(conversation, roles, row: int, column: str) -> list[dict[str, str]]:
    if conversation is None or isinstance(conversation, (str, bytes)) or not isinstance(conversation, Iterable):
        raise ValueError(f"row {row}: {column!r} must be a list of messages, got {type(conversation).__name__}")
    return [_standard_message(message, roles, row, column) for message in conversation]


def standardize_sharegpt(
    dataset,
    aliases_for_system: Iterable[str] | None = None,
    aliases_for_user: Iterable[str] | None = None,
    aliases_for_assistant: Iterable[str] | None = None,
    column: str = "conversations",
    num_proc: int | None = None,
):
    """Rewrite `dataset[column]` from ShareGPT messages to role/content messages.

    dataset: a `datasets.Dataset` or a list of dicts (rows). The result is of the same kind, with
        the same other columns; a list is copied, not changed in place.
    aliases_for_*: extra role names to accept (case-insensitive), on top of `ROLE_ALIASES`.
    column: the column holding the conversations.

    Messages already in role/content form pass through (with their roles standardised), so running
    it twice is harmless. Raises ValueError naming the row and the role for a role it does not know.
    """
    roles = _role_table(aliases_for_system, aliases_for_user, aliases_for_assistant)

    if isinstance(dataset, list):
        rows = []
        for index, row in enumerate(dataset):
            if not isinstance(row, dict) or column not in row:
                raise ValueError(f"row {index}: expected a dict with a {column!r} key")
            rows.append({**row, column: _standard_conversation(row[column], roles, index, column)})
        return rows

    column_names = getattr(dataset, "column_names", None)
    if column_names is None or not hasattr(dataset, "map"):
        raise TypeError(f"dataset must be a datasets.Dataset or a list of dicts, got {type(dataset).__name__}")
    if column not in column_names:
        raise ValueError(f"dataset has no {column!r} column; columns: {column_names}")

    def convert(batch, indices):
        return {
            column: [
                _standard_conversation(conversation, roles, index, column)
                for conversation, index in zip(batch[column], indices)
            ]
        }

    # The output column has a different struct type (role/content instead of from/value...), so
    # the old column is removed and the new one written under the same name.
    return dataset.map(
        convert,
        batched=True,
        with_indices=True,
        remove_columns=[column],
        num_proc=num_proc,
        desc="standardize_sharegpt",
    )
