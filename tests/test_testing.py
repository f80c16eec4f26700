"""Tests for loraforge.testing: offline tiny tokenizers and models."""

import pytest
import torch

from loraforge import testing as lt

# Text that stresses a byte-level tokenizer: multi-byte unicode, emoji, combining characters
# (which an NFC normaliser would rewrite), control whitespace, runs of spaces, and strings that
# look like special tokens without being them.
TRICKY_TEXTS = [
    "",
    " ",
    "Hello, world!",
    "line one\nline two\n\n\ttabbed   spaced  \r\n",
    "Ünïcødé, 日本語のテキスト, Ελληνικά, עברית, 🙂🍅🌧️",
    "e\u0301 (decomposed) vs \u00e9 (composed), zero\u200bwidth, nbsp\u00a0here",
    "<|im_start| and <im_end> are near misses, not special; 1234567890 + 3.14",
    "The kettle clicked off just as the rain began.",
]

CORPUS_SENTENCE = "The cat slept in a patch of sunlight on the kitchen floor."


@pytest.fixture(scope="module")
def tokenizer():
    return lt.build_tokenizer()


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def test_corpus_is_bundled():
    text = lt.corpus_text()
    assert 3_000 < len(text.encode()) < 20_000
    assert "Q:" in text and "A:" in text


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    # With special tokens on, only bos is added, and skipping specials restores the text.
    with_bos = tokenizer(text)["input_ids"]
    assert with_bos == [lt.BOS_ID] + ids
    assert tokenizer.decode(with_bos, skip_special_tokens=True) == text


def test_tokenizer_size_and_determinism(tokenizer):
    assert len(tokenizer) == 512
    again = lt.build_tokenizer()
    assert again is not tokenizer  # a fresh wrapper each call ...
    assert again.get_vocab() == tokenizer.get_vocab()  # ... over the same trained vocabulary
    # Settings on one wrapper must not leak into another through a shared backend.
    again.backend_tokenizer.enable_truncation(4)
    assert len(lt.build_tokenizer()(CORPUS_SENTENCE)["input_ids"]) > 4
    assert len(lt.build_tokenizer(300)) == 300
    with pytest.raises(ValueError, match="vocab_size"):
        lt.build_tokenizer(100)


def test_tokenizer_learned_merges(tokenizer):
    # A BPE trained on English should encode common words in far fewer tokens than bytes.
    ids = tokenizer(CORPUS_SENTENCE, add_special_tokens=False)["input_ids"]
    assert len(ids) < 0.5 * len(CORPUS_SENTENCE)


def test_special_tokens(tokenizer):
    expected = {
        "<|begin_of_text|>": 0,
        "<|end_of_text|>": 1,
        "<|pad|>": 2,
        "<|im_start|>": 3,
        "<|im_end|>": 4,
        "<unk>": 5,
    }
    for token, token_id in expected.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
        # Inside text each one stays a single token, never split into byte pieces.
        ids = tokenizer(f"a{token}b", add_special_tokens=False)["input_ids"]
        assert token_id in ids and len(ids) == 3
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|begin_of_text|>", 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|end_of_text|>", 1)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|pad|>", 2)
    assert (tokenizer.unk_token, tokenizer.unk_token_id) == ("<unk>", 5)
    assert set(expected) <= set(tokenizer.all_special_tokens)


CONVERSATION = [
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "It is blue."},
]


def test_chat_template(tokenizer):
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered == (
        "<|im_start|>user\nWhat colour is the sky?<|im_end|>\n"
        "<|im_start|>assistant\nIt is blue.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat colour is the sky?<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_assistant_mask(tokenizer):
    out = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assistant_ids = [i for i, m in zip(ids, mask) if m]
    # The mask covers the reply and its closing <|im_end|>, nothing of the prompt.
    assert tokenizer.decode(assistant_ids) == "It is blue.<|im_end|>"


def test_chat_template_options():
    assert lt.build_tokenizer(chat_template=None).chat_template is None
    custom = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert lt.build_tokenizer(chat_template=custom).apply_chat_template(CONVERSATION, tokenize=False) == (
        "What colour is the sky?It is blue."
    )
    with pytest.raises(ValueError, match="chat_template"):
        lt.build_tokenizer(chat_template="chatm")


# --------------------------------------------------------------------------------------------
# Configs and models
# --------------------------------------------------------------------------------------------

CONFIG_CLASSES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "gemma": "GemmaConfig",
    "gemma2": "Gemma2Config",
}


def test_architectures_listed():
    assert set(lt.ARCHITECTURES) == set(CONFIG_CLASSES)


@pytest.mark.parametrize("arch", lt.ARCHITECTURES)
def test_config(arch):
    config = lt.tiny_config(arch)
    assert type(config).__name__ == CONFIG_CLASSES[arch]
    assert config.vocab_size == 512
    assert (config.hidden_size, config.num_hidden_layers) == (64, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 1, 2)
    assert config.tie_word_embeddings == (arch not in ("llama", "mistral"))
    assert config._attn_implementation == "eager"
    if arch in ("mistral", "gemma2"):
        assert config.sliding_window < config.max_position_embeddings
    if arch == "gemma2":
        assert config.attn_logit_softcapping and config.final_logit_softcapping
    # Qwen2Config has no head_dim field; its model derives hidden_size // heads, the same value.
    wide = lt.tiny_config(arch, hidden_size=96, num_heads=6, num_kv_heads=3)
    assert getattr(wide, "head_dim", wide.hidden_size // wide.num_attention_heads) == 16


def test_config_overrides():
    config = lt.tiny_config("llama", vocab_size=300, rms_norm_eps=1e-3, tie_word_embeddings=True)
    assert (config.vocab_size, config.rms_norm_eps, config.tie_word_embeddings) == (300, 1e-3, True)


def test_unknown_arch():
    with pytest.raises(ValueError, match="gpt2") as info:
        lt.tiny_config("gpt2")
    assert "llama" in str(info.value)  # lists the valid choices
    with pytest.raises(ValueError, match="falcon"):
        lt.tiny_model("falcon")


def _batch(tokenizer):
    texts = [CORPUS_SENTENCE, "Q: What is seven plus five?\nA: Twelve."]
    return tokenizer(texts, padding=True, return_tensors="pt")


@pytest.mark.parametrize("arch", lt.ARCHITECTURES)
def test_forward(arch, tokenizer):
    model, tok = lt.tiny_model_and_tokenizer(arch)
    assert model.config.vocab_size == len(tok) == len(tokenizer)
    assert not model.training
    batch = _batch(tok)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, len(tok))
    assert torch.isfinite(logits).all()
    if arch == "gemma2":  # final soft-capping bounds the logits
        assert logits.abs().max() <= model.config.final_logit_softcapping
    # Tied families share one matrix for the embedding and the output head.
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == model.config.tie_word_embeddings


@pytest.mark.parametrize("arch", lt.ARCHITECTURES)
def test_loss_goes_down(arch, tokenizer):
    model = lt.tiny_model(arch, seed=1).train()
    ids = tokenizer([" ".join([CORPUS_SENTENCE] * 3)] * 2, return_tensors="pt")["input_ids"]
    # 3e-3 descends smoothly for every family and seed tried; 1e-2 spikes in the first steps.
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("arch", lt.ARCHITECTURES)
def test_save_and_load(arch, tokenizer, tmp_path):
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        PreTrainedTokenizerFast,
    )

    path = lt.save_tiny_model(tmp_path / arch, arch, seed=5)
    assert path == tmp_path / arch
    names = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= names
    assert not any(n.endswith(".bin") for n in names)

    # local_files_only: these loads must never look at the network.
    loaded = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", local_files_only=True)
    reference = lt.tiny_model(arch, seed=5)
    assert type(loaded) is type(reference)
    batch = _batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, reference(**batch).logits)

    # AutoTokenizer may pick a family-specific class (see save_tiny_model); ids for ordinary text,
    # special tokens and the chat template must still match.
    auto_tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    for line in lt.corpus_text().splitlines()[:40] + TRICKY_TEXTS[:4]:
        assert auto_tok(line)["input_ids"] == tokenizer(line)["input_ids"]
    assert auto_tok.apply_chat_template(CONVERSATION, tokenize=False) == tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False
    )
    assert (auto_tok.bos_token_id, auto_tok.eos_token_id, auto_tok.pad_token_id) == (0, 1, 2)
    # The generic class reloads the tokenizer exactly, for every family.
    exact = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    assert exact.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()

    generation = GenerationConfig.from_pretrained(path, local_files_only=True)
    assert generation.eos_token_id == [lt.EOS_ID, lt.IM_END_ID]
    assert generation.pad_token_id == lt.PAD_ID


def test_mistral_sliding_window_is_active():
    # Mistral is Llama plus a sliding window, and the same seed gives both the same weights, so
    # their logits agree while the sequence fits in the window and differ once it does not.
    llama, mistral = lt.tiny_model("llama"), lt.tiny_model("mistral")
    window = mistral.config.sliding_window
    ids = torch.randint(6, 512, (1, window + 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = llama(ids).logits, mistral(ids).logits
    torch.testing.assert_close(a[:, :window], b[:, :window])
    assert not torch.allclose(a[:, window:], b[:, window:])


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_seed_determinism(arch):
    state = torch.random.get_rng_state()
    first = lt.tiny_model(arch, seed=7)
    # Building a model leaves the caller's random stream untouched.
    assert torch.equal(torch.random.get_rng_state(), state)
    assert _same_weights(first, lt.tiny_model(arch, seed=7))
    assert not _same_weights(first, lt.tiny_model(arch, seed=8))


def test_dtype():
    full = lt.tiny_model("qwen3", seed=2)
    half = lt.tiny_model("qwen3", seed=2, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    # Drawn in float32 and then cast: the bf16 model is the rounded float32 one.
    for name, p in half.state_dict().items():
        assert torch.equal(p, full.state_dict()[name].to(torch.bfloat16)), name


def test_generate(tokenizer):
    # The quickstart path: chat prompt in, greedy tokens out, stopping within the budget.
    model = lt.tiny_model("llama")
    prompt = tokenizer.apply_chat_template(
        CONVERSATION[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**prompt, max_new_tokens=4)
    assert out.shape[0] == 1 and prompt["input_ids"].shape[1] < out.shape[1] <= prompt["input_ids"].shape[1] + 4
    assert torch.equal(out, model.generate(**prompt, max_new_tokens=4))
