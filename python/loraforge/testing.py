"""Tiny, fully offline models and tokenizers for tests and demos.

Everything here is built from scratch in-process: a byte-level BPE tokenizer trained on a small
English corpus that ships inside the package (``loraforge/assets/corpus.txt``), and randomly
initialised decoder-only models of the architectures loraforge supports. Nothing ever touches
the network or the Hugging Face hub, so tests run the same on an air-gapped CI box as on a laptop.

Typical use::

    from loraforge.testing import tiny_model_and_tokenizer

    model, tokenizer = tiny_model_and_tokenizer("qwen3", seed=1)
    batch = tokenizer(["Hello there."], return_tensors="pt")
    logits = model(**batch).logits          # [1, seq, len(tokenizer)]

The models are small (a few hundred thousand parameters with the defaults) so a forward and
backward pass take milliseconds on a CPU, yet they keep each family's distinctive pieces
(grouped-query attention, tied embeddings, Gemma-2 soft-capping and sliding windows, Qwen-3
q/k norms, Qwen-2 attention biases), which is what LoRA patching code needs to be tested against.
"""

from __future__ import annotations

import functools
import os
from importlib import resources

import torch

__all__ = [
    "ARCHITECTURES",
    "SPECIAL_TOKENS",
    "CHATML_TEMPLATE",
    "corpus_text",
    "build_tokenizer",
    "tiny_config",
    "tiny_model",
    "tiny_model_and_tokenizer",
    "save_tiny_model",
]

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")

# Special tokens are given to the BPE trainer first, so their ids are their positions here and do
# not depend on vocab_size. That lets tiny_config() fill in bos/eos/pad ids without training.
SPECIAL_TOKENS = (
    "<|begin_of_text|>",  # 0: bos
    "<|end_of_text|>",  # 1: eos
    "<|pad|>",  # 2: pad
    "<|im_start|>",  # 3: start of a chat turn
    "<|im_end|>",  # 4: end of a chat turn
    "<unk>",  # 5: unk (byte-level BPE never emits it; kept for code that expects one)
)
BOS_ID, EOS_ID, PAD_ID, IM_START_ID, IM_END_ID, UNK_ID = range(len(SPECIAL_TOKENS))

# 256 byte symbols must always fit, otherwise some text could not be encoded at all.
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)

# ChatML. Whitespace control (`{%-`) keeps the template itself from adding stray newlines. The
# {% generation %} markers change nothing in the rendered text; they let
# apply_chat_template(..., return_assistant_tokens_mask=True) find the assistant's tokens, which
# is what "train on completions only" needs. The trailing <|im_end|> is inside the marked span
# so the model learns to stop.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The only attention implementation every family here supports: Gemma-2 refuses "sdpa" because
# SDPA has no logit soft-capping. Eager is also the plain reference maths, which is what tests
# comparing a patched model against the original want.
ATTN_IMPLEMENTATION = "eager"


# --------------------------------------------------------------------------------------------
# Corpus and tokenizer
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def corpus_text() -> str:
    """The bundled English corpus (original prose and Q&A about everyday topics)."""
    return resources.files("loraforge").joinpath("assets", "corpus.txt").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=8)
def _trained_backend_json(vocab_size: int) -> str:
    """Train the byte-level BPE once per vocab size and return it serialised.

    The cache holds a JSON string rather than a `tokenizers.Tokenizer` on purpose: the wrapper
    transformers puts around a backend mutates it (padding and truncation settings live on the
    backend), so every caller gets a freshly parsed copy and cannot leak state into another test.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Byte-level pre-tokenizer + decoder: every string maps to bytes the vocabulary covers, and
    # decoding restores it exactly (unicode, newlines and repeated spaces included).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, even ones the corpus lacks, so nothing is ever out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    # Paragraphs as training "documents". Training is deterministic: ties between equally
    # frequent pairs are broken by symbol id, not by hash order, so every process gets the same
    # vocabulary (checked across interpreters with different hash seeds).
    tok.train_from_iterator(corpus_text().split("\n\n"), trainer=trainer)

    # Like Llama 3: prepend bos to every encoded text. ByteLevel first, with offsets untrimmed, so
    # character offsets (used by assistant masks and offset mappings) stay consistent.
    bos = SPECIAL_TOKENS[BOS_ID]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A",
                pair=f"{bos} $A {bos}:1 $B:1",
                special_tokens=[(bos, BOS_ID)],
            ),
        ]
    )
    return tok.to_str()


def build_tokenizer(vocab_size: int = 512, chat_template: str | None = "chatml"):
    """A byte-level BPE `transformers.PreTrainedTokenizerFast` trained on the bundled corpus.

    Special tokens have fixed ids (see `SPECIAL_TOKENS`): bos 0, eos 1, pad 2, <|im_start|> 3,
    <|im_end|> 4, unk 5. Encoding adds bos at the start (``add_special_tokens=False`` skips it).
    ``len(tokenizer)`` equals ``vocab_size`` unless the corpus runs out of pairs seen at least
    twice: the bundled one supports about 770 tokens, so larger requests come back smaller.

    chat_template: "chatml" for the bundled ChatML template, None for no template, or any Jinja
    template string of your own.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if not isinstance(vocab_size, int) or vocab_size < _MIN_VOCAB:
        raise ValueError(
            f"vocab_size must be an int >= {_MIN_VOCAB} (256 byte symbols + "
            f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}"
        )
    if chat_template == "chatml":
        chat_template = CHATML_TEMPLATE
    elif chat_template is not None and "{" not in chat_template:
        # A bare word other than "chatml" is almost certainly a typo, not a Jinja template.
        raise ValueError(f"chat_template must be 'chatml', None or a Jinja string, got {chat_template!r}")

    backend = Tokenizer.from_str(_trained_backend_json(vocab_size))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=SPECIAL_TOKENS[BOS_ID],
        eos_token=SPECIAL_TOKENS[EOS_ID],
        pad_token=SPECIAL_TOKENS[PAD_ID],
        unk_token=SPECIAL_TOKENS[UNK_ID],
        additional_special_tokens=[SPECIAL_TOKENS[IM_START_ID], SPECIAL_TOKENS[IM_END_ID]],
        # The default clean-up rewrites " ," as "," on decode, which breaks exact round trips.
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


# --------------------------------------------------------------------------------------------
# Configs and models
# --------------------------------------------------------------------------------------------


def _config_class(arch: str):
    import transformers

    names = {
        "llama": "LlamaConfig",
        "mistral": "MistralConfig",
        "qwen2": "Qwen2Config",
        "qwen3": "Qwen3Config",
        "gemma": "GemmaConfig",
        "gemma2": "Gemma2Config",
    }
    if arch not in names:
        raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}; got arch={arch!r}")
    return getattr(transformers, names[arch])


def tiny_config(
    arch: str,
    vocab_size: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 256,
    **overrides,
):
    """A small transformers config for `arch` (one of `ARCHITECTURES`).

    vocab_size None means the size of the default `build_tokenizer()`. Family traits are kept:
    grouped-query attention (num_kv_heads < num_heads), tied embeddings where the family's small
    checkpoints tie them (gemma, gemma2, qwen2, qwen3) and untied for llama and mistral, a sliding
    window for mistral, alternating sliding/full layers plus attention and final-logit
    soft-capping for gemma2. `overrides` are passed to the config class last and win.
    """
    cls = _config_class(arch)
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
    if vocab_size is None:
        vocab_size = len(build_tokenizer())
    head_dim = hidden_size // num_heads
    # A window well below the context length, so sequences of ordinary test lengths (> 64 tokens
    # with the defaults) actually exercise the sliding-window mask.
    window = max(max_position_embeddings // 4, 1)

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=arch in ("gemma", "gemma2", "qwen2", "qwen3"),
    )
    if arch == "mistral":
        kwargs["sliding_window"] = window
    elif arch == "gemma2":
        kwargs.update(
            sliding_window=window,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            # Released Gemma-2 models scale queries by head_dim**-0.5; the config default (256)
            # only matches the real head size, not ours.
            query_pre_attn_scalar=head_dim,
        )
    # Qwen2Config has no head_dim argument in transformers 5; it always uses hidden // heads.
    if arch == "qwen2":
        kwargs.pop("head_dim")
    kwargs.update(overrides)

    config = cls(**kwargs)
    # Not a serialised field: it has to be set again on every load (see save_tiny_model).
    config._attn_implementation = ATTN_IMPLEMENTATION
    return config


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A randomly initialised tiny causal LM for `arch`, in eval mode.

    The same seed always gives the same weights, without disturbing the caller's random state.
    Weights are drawn in float32 and then cast, so a bf16 model is exactly the rounded float32
    one for the same seed. `config_kwargs` go to `tiny_config`.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **config_kwargs)
    # devices=[] keeps fork_rng from initialising CUDA: the weights are drawn on the CPU anyway.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTN_IMPLEMENTATION)
    model.generation_config = _generation_config()
    return model.to(dtype).eval()


def tiny_model_and_tokenizer(
    arch: str = "llama", *, vocab_size: int = 512, chat_template: str | None = "chatml", **kw
):
    """(model, tokenizer) with the model's vocab_size equal to len(tokenizer).

    vocab_size and chat_template go to `build_tokenizer`; everything else to `tiny_model`.
    """
    tokenizer = build_tokenizer(vocab_size, chat_template)
    model = tiny_model(arch, vocab_size=len(tokenizer), **kw)
    return model, tokenizer


def _generation_config():
    from transformers import GenerationConfig

    # Stop on <|im_end|> as well as eos, as chat models do: a ChatML reply ends with <|im_end|>.
    # Greedy, so demos and tests are reproducible.
    return GenerationConfig(
        bos_token_id=BOS_ID,
        eos_token_id=[EOS_ID, IM_END_ID],
        pad_token_id=PAD_ID,
        do_sample=False,
    )


def save_tiny_model(path: str | os.PathLike, arch: str = "llama", **kw) -> str | os.PathLike:
    """Write a tiny model (safetensors), its tokenizer and generation config to `path`.

    The folder loads offline with AutoModelForCausalLM.from_pretrained(path) and
    AutoTokenizer.from_pretrained(path). Keyword arguments go to `tiny_model_and_tokenizer`.
    Note transformers does not store the attention implementation: pass
    attn_implementation="eager" to from_pretrained to get the exact maths the in-memory model
    uses (some families otherwise load with SDPA, which can differ in the last bits).

    For qwen2 folders transformers 5's AutoTokenizer ignores the saved tokenizer class and
    builds a Qwen2Tokenizer from the vocabulary and merges, with Qwen's split regex and an NFC
    normaliser. Ids for ordinary text are the same, but decomposed unicode (e.g. "e" + combining
    accent) no longer round-trips; PreTrainedTokenizerFast.from_pretrained(path) loads the exact
    tokenizer for every architecture. Returns `path`.
    """
    model, tokenizer = tiny_model_and_tokenizer(arch, **kw)
    os.makedirs(path, exist_ok=True)
    # transformers 5 writes safetensors only, tied weights stored once; the generation config
    # set in tiny_model() is saved alongside as generation_config.json.
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
