"""Response-only masking: every template, merged-marker tokenizers, trainers, collators, errors."""

import random
import types
import warnings

import pytest
import torch

from loraforge.data import (
    CHAT_TEMPLATES,
    get_chat_template,
    mask_non_responses,
    response_only,
    template_names,
    train_on_responses_only,
)
from loraforge.data.response_only import IGNORE_INDEX, ResponseOnlyCollator
from loraforge.testing import build_tokenizer


def needs_datasets():
    return pytest.importorskip("datasets")


CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]

# What each family's model writes after the generation prompt, before the reply text: Mistral and
# Vicuna put a space after "[/INST]" / "ASSISTANT:", Qwen-3's final reply opens an empty think block.
REPLY_PREFIXES = {"mistral": (" ", " "), "vicuna": (" ", " "), "qwen-3": ("", "<think>\n\n</think>\n\n")}


def templated_tokenizer(name, tokenizer=None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "added tokens, resize embeddings"
        return get_chat_template(tokenizer or build_tokenizer(), name, **kwargs)


def tokenize(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]


def trained_segments(tokenizer, labels):
    """The decoded runs of consecutive kept labels."""
    segments, run = [], []
    for label in [*labels, IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            run.append(label)
        elif run:
            segments.append(tokenizer.decode(run, skip_special_tokens=False))
            run = []
    return segments


def expected_segments(name, tokenizer):
    entry = CHAT_TEMPLATES[name]
    end = entry.resolve(entry.end_of_turn, tokenizer.eos_token)
    first, last = REPLY_PREFIXES.get(name, ("", ""))
    return [first + "Paris." + end, last + "Rome." + end]


def table_masker_kwargs(name, tokenizer):
    entry = CHAT_TEMPLATES[name]
    return dict(
        instruction_part=entry.instruction_part,
        response_part=entry.response_part,
        end_of_turn=entry.resolve(entry.end_of_turn, tokenizer.eos_token),
    )


@pytest.mark.parametrize("name", template_names())
def test_every_template_keeps_exactly_the_replies(name, monkeypatch):
    tokenizer = templated_tokenizer(name)
    ids = tokenize(tokenizer, CONVERSATION)
    labels = mask_non_responses(ids, tokenizer, **table_masker_kwargs(name, tokenizer))
    assert trained_segments(tokenizer, labels) == expected_segments(name, tokenizer)
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(labels, ids))

    # The same tokens transformers marks from the templates' {% generation %} spans.
    encoded = tokenizer.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    assert [int(label != IGNORE_INDEX) for label in labels] == encoded["assistant_masks"]

    # The fallback for tokenizers whose re-encoding differs (prefix decoding) agrees.
    monkeypatch.setattr(response_only, "_offsets_by_reencoding", lambda *args: None)
    assert mask_non_responses(ids, tokenizer, **table_masker_kwargs(name, tokenizer)) == labels


def test_tensor_input_and_padding_on_either_side():
    tokenizer = templated_tokenizer("chatml")
    ids = tokenize(tokenizer, CONVERSATION)
    expected = mask_non_responses(ids, tokenizer, **table_masker_kwargs("chatml", tokenizer))
    pad = [tokenizer.pad_token_id] * 3
    for padded, mask, labels in [
        (pad + ids, [0] * 3 + [1] * len(ids), [IGNORE_INDEX] * 3 + expected),
        (ids + pad, [1] * len(ids) + [0] * 3, expected + [IGNORE_INDEX] * 3),
    ]:
        out = mask_non_responses(
            torch.tensor(padded), tokenizer, **table_masker_kwargs("chatml", tokenizer), attention_mask=torch.tensor(mask)
        )
        assert isinstance(out, torch.Tensor) and out.tolist() == labels


def test_own_markers_without_end_of_turn_run_to_the_next_user_turn():
    tokenizer = templated_tokenizer("chatml")
    labels = mask_non_responses(tokenize(tokenizer, CONVERSATION), tokenizer, "<|im_start|>user", "<|im_start|>assistant\n")
    assert trained_segments(tokenizer, labels) == ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n"]


# --------------------------------------------------------------------------------------------
# A tokenizer that merges the markers with their neighbours
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def merging_tokenizer():
    """A byte-level BPE without pre-tokenizer splitting, trained on text where the markers sit
    glued to questions and replies, so merges run across them ("?\\n\\n### Response:\\nThe ")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    words = ["the", "cat", "dog", "sun", "rain", "tea", "cup", "red", "blue", "green", "Paris", "Rome", "city", "river", "hill"]

    def phrase():
        return " ".join(rng.choice(words) for _ in range(rng.randint(2, 5)))

    texts = []
    for _ in range(300):
        texts.append(
            f"### Instruction:\nName {phrase()}?\n\n### Response:\nThe {phrase()}.\n\n"
            f"### Instruction:\nWhy {phrase()}?\n\n### Response:\nThe {phrase()}."
        )
        texts.append(f"USER: Name {phrase()}? ASSISTANT: The {phrase()}.USER: Why? ASSISTANT: The {phrase()}.")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return backend.to_str()


def _fresh_merging_tokenizer(backend_json):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(backend_json),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )


def _reply_spans(text, replies):
    spans, start = [], 0
    for reply in replies:
        start = text.index(reply, start)
        spans.append((start, start + len(reply)))
        start += len(reply)
    return spans


@pytest.mark.parametrize("name", ["alpaca", "vicuna"])
def test_markers_merged_with_neighbours(name, merging_tokenizer, monkeypatch):
    tokenizer = templated_tokenizer(name, _fresh_merging_tokenizer(merging_tokenizer), system_message="Be brief.")
    entry = CHAT_TEMPLATES[name]
    conversation = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The city is Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "The Rome."},
    ]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    assert ids == tokenize(tokenizer, conversation)

    # Searching for the marker's own token ids would find nothing: BPE merged it with its neighbours.
    marker_ids = tokenizer(entry.response_part, add_special_tokens=False)["input_ids"]
    assert not any(ids[i : i + len(marker_ids)] == marker_ids for i in range(len(ids)))
    assert any(entry.response_part in tokenizer.decode([token]) for token in ids)  # a merged one

    labels = mask_non_responses(ids, tokenizer, **table_masker_kwargs(name, tokenizer))
    reply_spans = _reply_spans(text, [f"The city is Paris.{tokenizer.eos_token}", f"The Rome.{tokenizer.eos_token}"])
    for (start, end), label in zip(offsets, labels):
        overlaps = any(start < b and end > a for a, b in reply_spans)
        assert (label != IGNORE_INDEX) == overlaps, (text[start:end], label)
    segments = trained_segments(tokenizer, labels)
    assert len(segments) == 2
    for segment, reply in zip(segments, ["The city is Paris.", "The Rome."]):
        assert segment.endswith(reply + tokenizer.eos_token)
        assert "capital" not in segment and "Italy" not in segment  # no user text beyond a merged boundary

    # The prefix-decoding fallback finds the same tokens.
    monkeypatch.setattr(response_only, "_offsets_by_reencoding", lambda *args: None)
    assert mask_non_responses(ids, tokenizer, **table_masker_kwargs(name, tokenizer)) == labels


# --------------------------------------------------------------------------------------------
# Trainers
# --------------------------------------------------------------------------------------------


def _tokenized_dataset(tokenizer, conversations):
    rows = [tokenizer.apply_chat_template(c, return_dict=True) for c in conversations]
    rows = [{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"]} for r in rows]
    return needs_datasets().Dataset.from_list(rows)


@pytest.mark.parametrize("name", ["chatml", "llama-3", "alpaca"])
def test_trainer_dataset_gets_labels_with_markers_from_the_template(name):
    tokenizer = templated_tokenizer(name)
    dataset = _tokenized_dataset(tokenizer, [CONVERSATION, CONVERSATION[1:3]])
    trainer = types.SimpleNamespace(train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer)
    assert train_on_responses_only(trainer) is trainer
    labels = trainer.train_dataset["labels"]
    assert trained_segments(tokenizer, labels[0]) == expected_segments(name, tokenizer)
    assert trained_segments(tokenizer, labels[1]) == expected_segments(name, tokenizer)[:1]
    assert trainer.eval_dataset["labels"][:] == labels[:]

    # An IterableDataset is labelled lazily.
    trainer = types.SimpleNamespace(train_dataset=dataset.to_iterable_dataset(), processing_class=tokenizer)
    train_on_responses_only(trainer)
    assert [row["labels"] for row in trainer.train_dataset] == labels[:]

    # A list of rows and the older `.tokenizer` attribute work too.
    trainer = types.SimpleNamespace(train_dataset=dataset.to_list(), tokenizer=tokenizer)
    train_on_responses_only(trainer)
    assert [row["labels"] for row in trainer.train_dataset] == labels[:]


def test_nothing_trainable_raises():
    tokenizer = templated_tokenizer("chatml")
    dataset = _tokenized_dataset(tokenizer, [CONVERSATION[:2], CONVERSATION[1:2]])
    with pytest.raises(ValueError, match="no trainable token left in train_dataset"):
        train_on_responses_only(types.SimpleNamespace(train_dataset=dataset, processing_class=tokenizer))
    # Markers that do not match the data's format.
    dataset = _tokenized_dataset(tokenizer, [CONVERSATION])
    with pytest.raises(ValueError, match="no trainable token"):
        train_on_responses_only(
            types.SimpleNamespace(train_dataset=dataset, processing_class=tokenizer),
            instruction_part="### Instruction:\n",
            response_part="### Response:\n",
        )
    with pytest.raises(ValueError, match="could not tell the tokenizer's chat format"):
        train_on_responses_only(
            types.SimpleNamespace(train_dataset=dataset, processing_class=build_tokenizer(chat_template=None))
        )


def test_some_rows_without_replies_warn():
    tokenizer = templated_tokenizer("chatml")
    dataset = _tokenized_dataset(tokenizer, [CONVERSATION, CONVERSATION[:2]])
    with pytest.warns(UserWarning, match="1 of 2 rows"):
        train_on_responses_only(types.SimpleNamespace(train_dataset=dataset, processing_class=tokenizer))


def test_collator_that_rebuilds_labels_is_wrapped():
    from transformers import DataCollatorForLanguageModeling

    tokenizer = templated_tokenizer("llama-3")
    dataset = _tokenized_dataset(tokenizer, [CONVERSATION, CONVERSATION[1:3]])
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = types.SimpleNamespace(train_dataset=dataset, processing_class=tokenizer, data_collator=collator)
    train_on_responses_only(trainer)
    train_on_responses_only(trainer)  # a second call replaces the wrapper instead of stacking
    assert isinstance(trainer.data_collator, ResponseOnlyCollator) and trainer.data_collator.collator is collator

    for side in ("right", "left"):
        tokenizer.padding_side = side
        batch = trainer.data_collator([{"input_ids": row["input_ids"]} for row in dataset])
        for row_labels, row_mask, expected in zip(
            batch["labels"], batch["attention_mask"], [expected_segments("llama-3", tokenizer), expected_segments("llama-3", tokenizer)[:1]]
        ):
            assert trained_segments(tokenizer, row_labels.tolist()) == expected
            assert (row_labels[row_mask == 0] == IGNORE_INDEX).all()


def test_lazily_tokenizing_trainer():
    tokenizer = templated_tokenizer("gemma")

    def collate(rows):  # tokenizes in the collator, as some trainers do; labels = input_ids
        batch = tokenizer.apply_chat_template(
            [row["messages"] for row in rows], return_dict=True, padding=True, return_tensors="pt"
        )
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        return batch

    dataset = needs_datasets().Dataset.from_list([{"messages": CONVERSATION}, {"messages": CONVERSATION[:2]}])
    trainer = types.SimpleNamespace(train_dataset=dataset, processing_class=tokenizer, data_collator=collate)
    train_on_responses_only(trainer)
    assert trainer.train_dataset is dataset  # nothing to label up front
    batch = trainer.data_collator([dataset[0], dataset[1]])
    assert trained_segments(tokenizer, batch["labels"][0].tolist()) == expected_segments("gemma", tokenizer)
    assert trained_segments(tokenizer, batch["labels"][1].tolist()) == []
    with pytest.raises(ValueError, match="a batch has no trainable token"):
        trainer.data_collator([dataset[1]])

    with pytest.raises(ValueError, match="needs trainer.train_dataset with an 'input_ids' column"):
        train_on_responses_only(types.SimpleNamespace(train_dataset=dataset, processing_class=tokenizer))
