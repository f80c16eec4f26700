"""The tokenizer part of a GGUF file: vocabulary, merges, special tokens, chat template.

Byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen 2/2.5/3, and loraforge.testing's tiny one)
are written as llama.cpp's "gpt2" tokenizer model: every token in its byte-level unicode spelling,
its type (normal, control for special tokens, user-defined for other added tokens, unused for ids
the tokenizer does not fill), and the merges in rank order.

llama.cpp re-implements each family's pre-tokenizer (the regex that splits text into words before
BPE) under a name, `tokenizer.ggml.pre`. We read the tokenizer's own pre-tokenizer and pick the
llama.cpp name with the same split:

* a plain ByteLevel pre-tokenizer with its built-in regex (GPT-2's, as loraforge.testing builds)
  -> "gpt-2", which llama.cpp splits with the same GPT-2 regex;
* Llama 3's split regex -> "llama-bpe"; Qwen 2's -> "qwen2".

Anything else raises, rather than writing a file that silently tokenizes differently; the caller
can name a llama.cpp pre-tokenizer explicitly (`pre_tokenizer=`).

SentencePiece-style tokenizers as transformers' fast tokenizers hold them (Llama 2, Mistral v0.x,
Gemma: a BPE model with byte fallback and "▁" for spaces) are written as llama.cpp's "llama"
tokenizer model, which does not use merges but scores: at each step it joins the adjacent pair
whose concatenation is the vocabulary entry with the highest score. transformers' merges of such a
tokenizer are exactly those joins, ranked by the original scores, so a piece's score is minus the
rank of the first merge that makes it (pieces no merge makes, like single characters, rank below
all merges; control, byte and added tokens score 0, as in SentencePiece files). Whether a space is prepended
(Llama 2: yes, Gemma: no) is read from what the tokenizer does. One known difference is not ours:
transformers' non-legacy Metaspace adds no "▁" to a text that already starts with a space, while
SentencePiece and llama.cpp do. This path is checked against SentencePiece-style tokenizers built in
the tests, not against released checkpoints (none can be downloaded here).
"""

from __future__ import annotations

import json
import re

import gguf

__all__ = ["detect_pre_tokenizer", "strip_generation_markers", "write_tokenizer_metadata"]

# The split patterns of the pre-tokenizers we recognise, as tokenizer.json stores them.
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_KNOWN_SPLITS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def _backend(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise NotImplementedError(
            f"GGUF export needs a fast (tokenizers-backed) tokenizer; got {type(tokenizer).__name__}. "
            "Load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
        )
    return json.loads(backend.to_str())


def _pieces(pre_tokenizer: dict | None) -> list[dict]:
    if pre_tokenizer is None:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return [p for sub in pre_tokenizer["pretokenizers"] for p in _pieces(sub)]
    return [pre_tokenizer]


def detect_pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (see the module docstring)."""
    pieces = _pieces(_backend(tokenizer).get("pre_tokenizer"))
    kinds = [p.get("type") for p in pieces]
    if kinds == ["ByteLevel"] and pieces[0].get("use_regex", True) and not pieces[0].get("add_prefix_space", False):
        return "gpt-2"
    splits = [p for p in pieces if p.get("type") == "Split"]
    byte_level = [p for p in pieces if p.get("type") == "ByteLevel"]
    if len(splits) == 1 and len(byte_level) == 1 and not byte_level[0].get("use_regex", True):
        pattern = splits[0].get("pattern", {}).get("Regex")
        if pattern in _KNOWN_SPLITS:
            return _KNOWN_SPLITS[pattern]
    raise NotImplementedError(
        f"no llama.cpp pre-tokenizer is known to match this tokenizer's ({json.dumps(pieces)[:300]}); "
        "pass pre_tokenizer='<llama.cpp name>' (e.g. 'llama-bpe', 'qwen2', 'gpt-2') if you know the right one"
    )


def _looks_like_control(text: str) -> bool:
    # Chat-format markers that tokenizers add without flagging them special still act as control
    # tokens for llama.cpp (never produced by splitting ordinary text).
    return (text.startswith("<|") and text.endswith("|>")) or (text.startswith("<unused") and text.endswith(">"))


def _token_table(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    vocab = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise ValueError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model's vocabulary holds {vocab_size}; "
            "resize the model's embeddings (model.resize_token_embeddings(len(tokenizer))) before exporting"
        )
    by_id = {index: text for text, index in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            # Embedding rows past the tokenizer (vocabulary padded to a multiple of 64 etc.).
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        text = by_id[index]
        if index in added:
            special = added[index].special or _looks_like_control(text)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(text)
    return tokens, types


def strip_generation_markers(template: str) -> str:
    """Remove transformers' {% generation %} / {% endgeneration %} tags: they render nothing and
    exist only for assistant-token masks, and llama.cpp's and Ollama's template engines reject them."""
    return re.sub(r"\{%-?\s*(?:end)?generation\s*-?%\}", "", template)


def _chat_templates(tokenizer):
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        return strip_generation_markers(template)
    if isinstance(template, dict):
        return [{"name": name, "template": strip_generation_markers(text)} for name, text in template.items()]
    return None


def _adds_token(tokenizer, token_id: int | None, first: bool) -> bool:
    if token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0 if first else -1] == token_id


_SPACE = "\u2581"  # "▁", SentencePiece's visible space
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-F]{2}>$")


def _is_sentencepiece_style(backend: dict) -> bool:
    model = backend.get("model", {})
    return model.get("type") == "BPE" and bool(model.get("byte_fallback", False))


def _check_sentencepiece_text_handling(backend: dict) -> None:
    """llama.cpp's SentencePiece path only turns spaces into "▁" (and optionally prepends one);
    a tokenizer whose normalizer or pre-tokenizer does more would tokenize differently there."""
    normalizers = backend.get("normalizer") or {}
    normalizers = normalizers.get("normalizers", [normalizers]) if normalizers else []
    for step in normalizers:
        kind = step.get("type")
        if kind == "Prepend" and step.get("prepend") == _SPACE:
            continue
        if kind == "Replace" and step.get("pattern", {}).get("String") == " " and step.get("content") == _SPACE:
            continue
        raise NotImplementedError(
            f"this SentencePiece-style tokenizer normalizes text ({kind}), which llama.cpp does not"
        )
    for step in _pieces(backend.get("pre_tokenizer")):
        if step.get("type") != "Metaspace" or step.get("replacement") != _SPACE or step.get("split", False):
            raise NotImplementedError(
                f"this SentencePiece-style tokenizer pre-tokenizes text ({step}), which llama.cpp does not"
            )


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    # tokenizer.json stores merges as "left right" strings (older files) or [left, right] pairs.
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def _sentencepiece_token_table(tokenizer, model: dict, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    tokens, types = _token_table(tokenizer, vocab_size)
    merges = _merge_pairs(model)
    first_rank: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        first_rank.setdefault(left + right, rank)
    scores = []
    for index, (text, kind) in enumerate(zip(tokens, types)):
        if kind == gguf.TokenType.NORMAL and _BYTE_TOKEN.match(text):
            types[index] = gguf.TokenType.BYTE
        elif index == tokenizer.unk_token_id:
            types[index] = gguf.TokenType.UNKNOWN
        if types[index] != gguf.TokenType.NORMAL:
            scores.append(0.0)
        else:
            scores.append(-float(first_rank.get(text, len(merges) + index)))
    return tokens, scores, types


def _prepends_space(tokenizer) -> bool:
    ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(ids) and tokenizer.convert_ids_to_tokens(ids[0]).startswith(_SPACE)


def _write_vocabulary(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, pre_tokenizer: str | None) -> None:
    backend = _backend(tokenizer)
    model = backend.get("model", {})
    if _is_sentencepiece_style(backend):
        _check_sentencepiece_text_handling(backend)
        tokens, scores, types = _sentencepiece_token_table(tokenizer, model, vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types([int(t) for t in types])
        writer.add_add_space_prefix(_prepends_space(tokenizer))
        return
    if model.get("type") != "BPE":
        raise NotImplementedError(
            f"GGUF export writes BPE tokenizers (byte-level like Llama 3 and Qwen, or SentencePiece-style like "
            f"Llama 2 and Gemma); this tokenizer's model is {model.get('type')!r}"
        )
    pre = pre_tokenizer or detect_pre_tokenizer(tokenizer)
    tokens, types = _token_table(tokenizer, vocab_size)
    merges = [f"{left} {right}" for left, right in _merge_pairs(model)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)


def write_tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, pre_tokenizer: str | None = None):
    """Add the tokenizer.* keys for `tokenizer` (a transformers fast tokenizer) to `writer`."""
    _write_vocabulary(writer, tokenizer, vocab_size, pre_tokenizer)

    ids = {
        "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id,
    }  # fmt: skip
    for kind, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):  # fmt: skip
        if ids[kind] is not None:
            add(int(ids[kind]))
    # What the tokenizer actually does, not what its config claims.
    writer.add_add_bos_token(_adds_token(tokenizer, ids["bos"], first=True))
    writer.add_add_eos_token(_adds_token(tokenizer, ids["eos"], first=False))
    templates = _chat_templates(tokenizer)
    if templates:
        writer.add_chat_template(templates)
