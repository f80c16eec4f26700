"""Tokenizers in GGUF: llama.cpp must split text into the same ids as transformers.

Besides loraforge.testing's tokenizer (GPT-2 pre-tokenizer), we build byte-level BPE tokenizers
with Llama 3's and Qwen 2's split regexes, and SentencePiece-style ones (Llama 2 / Gemma). Their vocabularies are made by hand so that the three pre-tokenizers give
three different tokenizations of the same digits: if the GGUF named the wrong llama.cpp
pre-tokenizer, the ids would differ.
"""

import pytest
from loraforge import testing
from loraforge.export import save_pretrained_gguf
from loraforge.export.gguf_tokenizer import _LLAMA3_SPLIT, _QWEN2_SPLIT, detect_pre_tokenizer, strip_generation_markers

from tests.export import _llama_cpp

pytest.importorskip("gguf")
_llama_cpp.llama_cpp()

TOKENIZER_TEXTS = [
    "Hello world",
    "  two  spaces\n\nnew lines\t and a tab",
    "numbers 12345 and 3.14159!",
    "naïve café — «quotes» 日本語 🚀",
    "don't we'll I'M",
    "trailing spaces   ",
]


def test_tiny_tokenizer_ids_match(tmp_path):
    model, tokenizer = testing.tiny_model_and_tokenizer("qwen3", seed=0, hidden_size=64)
    (path,) = save_pretrained_gguf(model, tmp_path, tokenizer, "q8_0", write_modelfile=False)
    meta = _llama_cpp.metadata(path)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.add_bos_token"] is True  # our tokenizer prepends bos, like Llama 3
    assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert "generation %}" in tokenizer.chat_template  # transformers-only tags ...
    assert "generation %}" not in meta["tokenizer.chat_template"]  # ... are removed for llama.cpp
    theirs = _llama_cpp.tokenize(path, TOKENIZER_TEXTS, add_bos=True, special=False)
    assert theirs == [tokenizer(text)["input_ids"] for text in TOKENIZER_TEXTS]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    (theirs_chat,) = _llama_cpp.tokenize(path, [chat], add_bos=False, special=True)
    assert theirs_chat == tokenizer(chat, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in theirs_chat


# Merges in rank order. "3 4" comes first, so GPT-2's whole-number chunks pair 3 with 4, which
# Llama 3's three-digit chunks ("123" "456") keep apart and Qwen 2's single digits never merge.
MERGES = [("3", "4"), ("1", "2"), ("5", "6"), ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("o", "k")]
PROBE = "123456 and 3456, the 12 ok"


def _hand_made_tokenizer(pre_tokenizer):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    vocab = {token: index for index, token in enumerate(specials)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=specials[0], eos_token=specials[1])


def _pre_tokenizer(kind):
    from tokenizers import Regex, pre_tokenizers

    if kind == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pattern = {"llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}[kind]
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def test_pre_tokenizers_are_told_apart_and_match_llama_cpp(tmp_path):
    ids = {}
    for kind in ("gpt-2", "llama-bpe", "qwen2"):
        tokenizer = _hand_made_tokenizer(_pre_tokenizer(kind))
        assert detect_pre_tokenizer(tokenizer) == kind
        model = testing.tiny_model("llama", vocab_size=len(tokenizer) + 3, hidden_size=64)  # padded vocabulary
        (path,) = save_pretrained_gguf(model, tmp_path / kind, tokenizer, "f32", write_modelfile=False)
        ids[kind] = tokenizer(PROBE)["input_ids"]
        assert _llama_cpp.tokenize(path, [PROBE], add_bos=True, special=False) == [ids[kind]], kind
        embedding_shape = _llama_cpp.tensors(path)["token_embd.weight"][1]  # ggml order: (hidden, vocab)
        assert embedding_shape[1] == len(tokenizer) + 3  # padded rows kept; their tokens are "unused"
    assert len({tuple(v) for v in ids.values()}) == 3  # three genuinely different tokenizations


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    from tokenizers import pre_tokenizers

    tokenizer = _hand_made_tokenizer(pre_tokenizers.Whitespace())
    model = testing.tiny_model("llama", vocab_size=len(tokenizer), hidden_size=64)
    with pytest.raises(NotImplementedError, match="pre_tokenizer="):
        save_pretrained_gguf(model, tmp_path, tokenizer, "f32")
    assert list(tmp_path.iterdir()) == []


def _sentencepiece_style_tokenizer(prepend_space: bool):
    """A tokenizer shaped like transformers' conversion of a SentencePiece BPE model (Llama 2,
    Gemma): unk/bos/eos, the 256 byte pieces, then the learned pieces; merges derived from the
    vocabulary (every split of a piece into two pieces, ranked by the piece's learned priority);
    byte fallback; spaces as "▁", with one prepended (Llama 2) or not (Gemma). The pieces' ids are
    in alphabetical order, not priority order, so the export cannot get the priorities from ids."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    space = "\u2581"
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement=space, prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=700, min_frequency=2, show_progress=False)
    learner.train_from_iterator(testing.corpus_text().split("\n\n"), trainer=trainer)
    learned = learner.get_vocab()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{byte:02X}>": 3 + byte for byte in range(256)})
    for piece in sorted(learned):
        vocab.setdefault(piece, len(vocab))
    pieces = {piece for piece in learned if piece in vocab and vocab[piece] >= 3 + 256}
    splits = [
        ((learned[piece], learned[piece[:k]], learned[piece[k:]]), (piece[:k], piece[k:]))
        for piece in pieces
        for k in range(1, len(piece))
        if piece[:k] in pieces and piece[k:] in pieces
    ]
    merges = [pair for _, pair in sorted(splits)]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    steps = [normalizers.Prepend(space)] if prepend_space else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", space)])
    backend.decoder = decoders.Sequence([decoders.Replace(space, " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


SENTENCEPIECE_TEXTS = [
    "Hello world",
    "The cat sat on the warm mat. Rain falls softly on the roof today.",
    "  two  spaces\n\nnew lines\t and a tab",
    "naïve café — «quotes» 日本語 🚀",  # characters outside the vocabulary: byte fallback
    "numbers 12345 and 3.14!",
]


@pytest.mark.parametrize("prepend_space", (True, False), ids=("llama2-style", "gemma-style"))
def test_sentencepiece_style_tokenizer_matches_llama_cpp(tmp_path, prepend_space):
    tokenizer = _sentencepiece_style_tokenizer(prepend_space)
    model = testing.tiny_model("llama", vocab_size=len(tokenizer), hidden_size=64)
    (path,) = save_pretrained_gguf(model, tmp_path, tokenizer, "f32", write_modelfile=False)
    meta = _llama_cpp.metadata(path)
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.add_space_prefix"] is prepend_space
    theirs = _llama_cpp.tokenize(path, SENTENCEPIECE_TEXTS, add_bos=True, special=False)
    assert theirs == [tokenizer(text)["input_ids"] for text in SENTENCEPIECE_TEXTS]


def test_unsupported_tokenizers_are_refused(tmp_path):
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    nfkc = _sentencepiece_style_tokenizer(True)
    nfkc.backend_tokenizer.normalizer = normalizers.NFKC()
    word_piece = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]")),
        unk_token="[UNK]",
    )
    for tokenizer, message in ((nfkc, "normalizes text"), (word_piece, "'WordPiece'")):
        model = testing.tiny_model("llama", vocab_size=len(tokenizer) + 8, hidden_size=64)  # room for pad id 2
        with pytest.raises(NotImplementedError, match=message):
            save_pretrained_gguf(model, tmp_path, tokenizer, "f32")
    too_small = testing.tiny_model("llama", vocab_size=100, hidden_size=64)
    with pytest.raises(ValueError, match="resize the model's embeddings"):
        save_pretrained_gguf(too_small, tmp_path, testing.build_tokenizer(), "f32")
    assert list(tmp_path.iterdir()) == []


def test_generation_markers_are_stripped():
    template = "{%- generation %}{{ x }}{% endgeneration -%}{% if add_generation_prompt %}y{% endif %}"
    assert strip_generation_markers(template) == "{{ x }}{% if add_generation_prompt %}y{% endif %}"
