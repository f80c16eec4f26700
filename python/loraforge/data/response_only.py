"""Train on assistant replies only: labels are -100 everywhere but the assistant's turns.

    trainer = SFTTrainer(model=model, train_dataset=dataset, processing_class=tokenizer, ...)
    trainer = train_on_responses_only(trainer)          # markers from the tokenizer's template

How a reply is found. Searching for the marker's token ids inside input_ids fails whenever a BPE
merges the marker with its neighbours ("Response:\\nThe" can be one token, or "\\n" + "\\n###"),
which is common for plain-text markers such as Alpaca's and Vicuna's. So the work is done on text:

1. decode input_ids, and get each token's character span in that text: from the fast tokenizer's
   offsets when re-encoding the text gives back the same ids, otherwise by decoding prefixes
   (binary search, only around the reply boundaries);
2. find the replies in the text: each starts right after `response_part` and ends right after
   the template's end-of-turn token, or where the next `instruction_part` (or `response_part`)
   begins, whichever comes first;
3. keep a token's label if any of its characters lie in a reply, so a token that straddles the
   marker's end and the reply's first characters is trained (the model has to produce it).

`response_part` is the tail of the generation prompt, so the kept labels are exactly what a model
writes after that prompt at inference: the reply and its end-of-turn token. They are the tokens
transformers' assistant mask marks for our templates (their {% generation %} spans), too.

Supported trainers (anything with these attributes, e.g. transformers' Trainer, TRL's SFTTrainer):

* ``trainer.train_dataset`` (and ``eval_dataset``) holding tokenized rows ("input_ids", optional
  "attention_mask"): a `datasets.Dataset`, `datasets.IterableDataset` or list of dicts. Its
  "labels" are (re)written; for a Dataset or list, a dataset with no trainable token left raises.
* ``trainer.data_collator``, if set, is wrapped in `ResponseOnlyCollator`, which masks every batch
  it returns again. That covers collators that rebuild labels from input_ids (transformers'
  DataCollatorForLanguageModeling does) and trainers whose dataset is tokenized lazily by the
  collator; with no tokenized dataset to check, a batch with nothing trainable raises instead.
* the tokenizer comes from ``trainer.processing_class`` or ``trainer.tokenizer`` (a processor's
  ``.tokenizer`` is used), or the ``tokenizer=`` argument.
"""

from __future__ import annotations

import warnings
from itertools import accumulate

from loraforge.data.chat_templates import detect_chat_template

__all__ = [
    "IGNORE_INDEX",
    "ResponseMasker",
    "ResponseOnlyCollator",
    "mask_non_responses",
    "response_char_spans",
    "train_on_responses_only",
]

IGNORE_INDEX = -100  # the label cross-entropy skips (torch and transformers default)


# --------------------------------------------------------------------------------------------
# One sequence
# --------------------------------------------------------------------------------------------


def response_char_spans(
    text: str, instruction_part: str | None, response_part: str, end_of_turn: str | None = None
) -> list[tuple[int, int]]:
    """Character spans [start, end) of the assistant replies in `text` (see the module docstring)."""
    if not response_part:
        raise ValueError("response_part must be a non-empty string")
    spans = []
    search_from = 0
    while (marker := text.find(response_part, search_from)) >= 0:
        start = marker + len(response_part)
        ends = [len(text)]
        for boundary in (instruction_part, response_part):
            if boundary and (found := text.find(boundary, start)) >= 0:
                ends.append(found)
        if end_of_turn and (found := text.find(end_of_turn, start)) >= 0:
            ends.append(found + len(end_of_turn))
        end = min(ends)
        if end > start:
            spans.append((start, end))
        search_from = max(end, start)
    return spans


def _decode(tokenizer, ids) -> str:
    # No clean-up: it rewrites " ," as "," and would move every offset after it.
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _offsets_by_reencoding(tokenizer, text: str, ids: list[int]):
    """Token character spans from the fast tokenizer, if encoding `text` reproduces `ids`."""
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizers have no offsets
        return None
    if list(encoding["input_ids"]) != ids:
        return None
    return [tuple(span) for span in encoding["offset_mapping"]]


def _tokens_in_spans_by_prefix_decoding(tokenizer, ids: list[int], spans) -> list[bool]:
    """Which tokens overlap `spans`, measuring text lengths of decoded prefixes of `ids`.

    Token k covers characters [ends(k), ends(k + 1)), ends(k) = len(decode(ids[:k])). Prefix lengths
    grow with k, so each span's first and last token are found by binary search: O(log n) decodes
    per boundary instead of one per token.
    """
    cache = {0: 0}

    def ends(k: int) -> int:
        if k not in cache:
            cache[k] = len(_decode(tokenizer, ids[:k]))
        return cache[k]

    def first(predicate, lo: int, hi: int) -> int:  # smallest k in [lo, hi) with predicate, else hi
        while lo < hi:
            mid = (lo + hi) // 2
            if predicate(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo

    n = len(ids)
    keep = [False] * n
    for start, end in spans:
        first_token = first(lambda k, start=start: ends(k + 1) > start, 0, n)
        stop_token = first(lambda k, end=end: ends(k) >= end, first_token, n)
        for k in range(first_token, stop_token):
            keep[k] = True
    return keep


def _tokens_in_spans(offsets, spans, text_length: int) -> list[bool]:
    # in_reply[c] = 1 if character c is in a reply; prefix sums answer "any character of
    # [s, e) in a reply?" in O(1) per token.
    in_reply = [0] * (text_length + 1)
    for start, end in spans:
        for c in range(start, end):
            in_reply[c] = 1
    covered = [0, *accumulate(in_reply)]
    return [end > start and covered[end] - covered[start] > 0 for start, end in offsets]


def _trainable_tokens(tokenizer, ids: list[int], instruction_part, response_part, end_of_turn) -> list[bool]:
    if not ids:
        return []
    text = _decode(tokenizer, ids)
    spans = response_char_spans(text, instruction_part, response_part, end_of_turn)
    if not spans:
        return [False] * len(ids)
    offsets = _offsets_by_reencoding(tokenizer, text, ids)
    if offsets is not None:
        return _tokens_in_spans(offsets, spans, len(text))
    return _tokens_in_spans_by_prefix_decoding(tokenizer, ids, spans)


def mask_non_responses(
    input_ids,
    tokenizer,
    instruction_part: str | None,
    response_part: str,
    *,
    end_of_turn: str | None = None,
    attention_mask=None,
):
    """Labels for one sequence: input_ids inside assistant replies, IGNORE_INDEX elsewhere.

    input_ids: a list of ints or a 1-D tensor (the result has the same kind).
    instruction_part / response_part: the texts that begin a user turn / an assistant turn, e.g.
        "<|im_start|>user\\n" and "<|im_start|>assistant\\n". instruction_part may be None.
    end_of_turn: the token that ends a reply (e.g. "<|im_end|>"); the reply's label span ends
        right after it. None: a reply runs to the next instruction_part (or the end).
    attention_mask: positions where it is 0 (padding, on either side) get IGNORE_INDEX and are
        left out of the text that is searched.
    """
    as_tensor = hasattr(input_ids, "tolist")
    ids = input_ids.tolist() if as_tensor else list(input_ids)
    if attention_mask is not None:
        attention = attention_mask.tolist() if hasattr(attention_mask, "tolist") else list(attention_mask)
        if len(attention) != len(ids):
            raise ValueError(f"attention_mask has {len(attention)} entries for {len(ids)} input_ids")
        positions = [i for i, keep in enumerate(attention) if keep]
    else:
        positions = list(range(len(ids)))

    kept_ids = [ids[i] for i in positions]
    trainable = _trainable_tokens(tokenizer, kept_ids, instruction_part, response_part, end_of_turn)
    labels = [IGNORE_INDEX] * len(ids)
    for position, token, train in zip(positions, kept_ids, trainable):
        if train:
            labels[position] = token
    if as_tensor:
        import torch

        return torch.tensor(labels, dtype=torch.long, device=input_ids.device)
    return labels


class ResponseMasker:
    """The markers and tokenizer of one chat format, applied to sequences (picklable, for
    datasets.map workers and DataLoader workers)."""

    def __init__(self, tokenizer, instruction_part, response_part, end_of_turn=None):
        self.tokenizer = tokenizer
        self.instruction_part = instruction_part
        self.response_part = response_part
        self.end_of_turn = end_of_turn

    def __call__(self, input_ids, attention_mask=None):
        return mask_non_responses(
            input_ids,
            self.tokenizer,
            self.instruction_part,
            self.response_part,
            end_of_turn=self.end_of_turn,
            attention_mask=attention_mask,
        )

    def describe(self) -> str:
        return f"instruction_part={self.instruction_part!r}, response_part={self.response_part!r}"


# --------------------------------------------------------------------------------------------
# Trainers
# --------------------------------------------------------------------------------------------


class ResponseOnlyCollator:
    """Wraps a data collator: every batch it returns gets response-only labels.

    Labels the inner collator set to IGNORE_INDEX (padding, its own masks) stay ignored; everything
    outside the assistant replies is set to IGNORE_INDEX. `require_trainable`: raise on a batch with
    no trainable token (used when the dataset could not be checked up front).
    """

    def __init__(self, collator, masker: ResponseMasker, require_trainable: bool = False):
        self.collator = collator
        self.masker = masker
        self.require_trainable = require_trainable

    def __call__(self, features, *args, **kwargs):
        import torch

        batch = self.collator(features, *args, **kwargs)
        input_ids = torch.as_tensor(batch["input_ids"])
        rows = input_ids.reshape(-1, input_ids.shape[-1])
        attention = batch.get("attention_mask")
        attention = None if attention is None else torch.as_tensor(attention).reshape(rows.shape)
        masked = torch.stack(
            [self.masker(row, None if attention is None else attention[i]) for i, row in enumerate(rows)]
        ).reshape(input_ids.shape)
        previous = batch.get("labels")
        if previous is not None:  # keep the inner collator's own ignores (padding, its masks)
            masked = torch.where(masked != IGNORE_INDEX, torch.as_tensor(previous), IGNORE_INDEX)
        if self.require_trainable and not bool((masked != IGNORE_INDEX).any()):
            raise ValueError(
                f"a batch has no trainable token left after response-only masking ({self.masker.describe()})"
            )
        batch["labels"] = masked
        return batch


def _trainer_tokenizer(trainer):
    tokenizer = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    # A multimodal processor wraps the tokenizer; it forwards decode() but its __call__ wants
    # images too, so use the tokenizer inside.
    if hasattr(getattr(tokenizer, "tokenizer", None), "decode"):
        tokenizer = tokenizer.tokenizer
    if tokenizer is None or not hasattr(tokenizer, "decode"):
        raise ValueError("the trainer has no tokenizer (processing_class or tokenizer); pass tokenizer=...")
    return tokenizer


def _resolve_markers(tokenizer, instruction_part, response_part, end_of_turn):
    template = detect_chat_template(tokenizer)
    if template is not None:
        matches_template = instruction_part in (None, template.instruction_part) and response_part in (
            None,
            template.response_part,
        )
        if instruction_part is None:
            instruction_part = template.instruction_part
        if response_part is None:
            response_part = template.response_part
        # The end-of-turn token belongs to the template's markers; with markers of your own,
        # replies run to the next instruction_part unless end_of_turn is given.
        if end_of_turn is None and matches_template:
            end_of_turn = template.resolve(template.end_of_turn, tokenizer.eos_token)
    if response_part is None:
        raise ValueError(
            "could not tell the tokenizer's chat format (use get_chat_template, or pass "
            "instruction_part= and response_part=, e.g. '<|im_start|>user\\n' and '<|im_start|>assistant\\n')"
        )
    return instruction_part, response_part, end_of_turn


def _is_tokenized(dataset) -> bool:
    if dataset is None:
        return False
    if isinstance(dataset, list):
        return bool(dataset) and isinstance(dataset[0], dict) and "input_ids" in dataset[0]
    names = getattr(dataset, "column_names", None)
    return names is not None and "input_ids" in names


def _with_labels(dataset, masker: ResponseMasker, what: str, num_proc, strict: bool):
    """`dataset` with response-only "labels"; checks that something is left to train on."""
    if isinstance(dataset, list):
        rows = [{**row, "labels": masker(row["input_ids"], row.get("attention_mask"))} for row in dataset]
        counts = [sum(label != IGNORE_INDEX for label in row["labels"]) for row in rows]
    else:
        count_column = "lf_num_trainable_tokens"

        def label_batch(batch):
            masks = batch.get("attention_mask") or [None] * len(batch["input_ids"])
            labels = [masker(ids, mask) for ids, mask in zip(batch["input_ids"], masks)]
            return {"labels": labels, count_column: [sum(x != IGNORE_INDEX for x in row) for row in labels]}

        # An IterableDataset maps lazily and takes neither num_proc nor desc.
        kwargs = {"num_proc": num_proc, "desc": "train_on_responses_only"} if hasattr(dataset, "__len__") else {}
        rows = dataset.map(label_batch, batched=True, **kwargs)
        if not hasattr(rows, "__len__"):  # IterableDataset: labelled lazily, nothing to check now
            return rows.remove_columns([count_column])
        counts = list(rows[count_column])
        rows = rows.remove_columns([count_column])

    empty = sum(count == 0 for count in counts)
    if counts and empty == len(counts):
        message = (
            f"train_on_responses_only: no trainable token left in {what} ({len(counts)} rows): "
            f"no assistant reply found with {masker.describe()}. Check the markers match the chat "
            "template the data was rendered with, and that truncation does not cut the replies off."
        )
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=3)
    elif empty:
        warnings.warn(
            f"train_on_responses_only: {empty} of {len(counts)} rows of {what} have no trainable token "
            "(no reply found, or truncated away); they add nothing to the loss.",
            stacklevel=3,
        )
    return rows


def train_on_responses_only(
    trainer,
    instruction_part: str | None = None,
    response_part: str | None = None,
    *,
    end_of_turn: str | None = None,
    tokenizer=None,
    num_proc: int | None = None,
):
    """Make `trainer` learn from the assistant replies only; returns the trainer (changed in place).

    instruction_part / response_part: the texts that begin a user turn / an assistant turn. When
        not given they come from the chat template table entry matching the tokenizer's
        chat_template (see `detect_chat_template`), together with its end-of-turn token.
    end_of_turn: the token that closes a reply, for markers of your own.
    See the module docstring for the forms of trainer this supports.
    """
    tokenizer = tokenizer if tokenizer is not None else _trainer_tokenizer(trainer)
    masker = ResponseMasker(tokenizer, *_resolve_markers(tokenizer, instruction_part, response_part, end_of_turn))

    train_tokenized = _is_tokenized(getattr(trainer, "train_dataset", None))
    if train_tokenized:
        trainer.train_dataset = _with_labels(trainer.train_dataset, masker, "train_dataset", num_proc, strict=True)
    eval_dataset = getattr(trainer, "eval_dataset", None)
    if isinstance(eval_dataset, dict):
        trainer.eval_dataset = {
            name: _with_labels(split, masker, f"eval_dataset[{name!r}]", num_proc, strict=False)
            if _is_tokenized(split)
            else split
            for name, split in eval_dataset.items()
        }
    elif _is_tokenized(eval_dataset):
        trainer.eval_dataset = _with_labels(eval_dataset, masker, "eval_dataset", num_proc, strict=False)

    collator = getattr(trainer, "data_collator", None)
    if collator is not None:
        if isinstance(collator, ResponseOnlyCollator):  # called twice: replace, don't stack
            collator = collator.collator
        trainer.data_collator = ResponseOnlyCollator(collator, masker, require_trainable=not train_tokenized)
    elif not train_tokenized:
        raise ValueError(
            "train_on_responses_only needs trainer.train_dataset with an 'input_ids' column, or a "
            "trainer.data_collator that tokenizes (to wrap)"
        )
    return trainer
