"""Ollama Modelfiles: template, stop tokens, system prompt and parameters from the template table."""

import warnings

import pytest
from loraforge import testing
from loraforge.data import get_chat_template
from loraforge.data.templates import CHAT_TEMPLATES
from loraforge.export.modelfile import modelfile_text


def _parse(text):
    """Modelfile -> (FROM, TEMPLATE, SYSTEM, [(parameter, value)])."""
    blocks, parameters = {}, []
    rest = text
    while rest:
        keyword, _, rest = rest.partition(" ")
        if rest.startswith('"""'):
            value, _, rest = rest[3:].partition('"""')
            rest = rest.lstrip("\n")
        else:
            value, _, rest = rest.partition("\n")
        if keyword == "PARAMETER":
            name, _, raw = value.partition(" ")
            parameters.append((name, raw))
        else:
            blocks[keyword] = value
    return blocks.get("FROM"), blocks.get("TEMPLATE"), blocks.get("SYSTEM"), parameters


@pytest.fixture
def tiny():
    return testing.tiny_model_and_tokenizer("llama", seed=0)


def test_chatml_tokenizer(tiny):
    model, tokenizer = tiny
    source, template, system, parameters = _parse(modelfile_text(model, tokenizer, "m.Q8_0.gguf"))
    assert source == "./m.Q8_0.gguf"
    assert template == CHAT_TEMPLATES["chatml"].ollama
    assert system is None  # ChatML has no default system prompt
    assert ("stop", '"<|im_end|>"') in parameters and ("stop", '"<|im_start|>"') in parameters
    assert ("num_ctx", "256") in parameters  # the model's trained context
    assert ("temperature", "0.7") in parameters


def test_fine_tuned_context_and_sampling_defaults(tiny):
    model, tokenizer = tiny
    model.max_seq_length = 128  # FastLanguageModel records the length it was trained with
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.6
    model.generation_config.top_p = 0.9
    _, _, _, parameters = _parse(modelfile_text(model, tokenizer, "m.gguf"))
    assert ("num_ctx", "128") in parameters
    assert ("temperature", "0.6") in parameters and ("top_p", "0.9") in parameters


def test_system_prompt_from_the_table_and_from_the_user(tiny):
    model, tokenizer = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_chat_template(tokenizer, "qwen-2.5")
    _, _, system, _ = _parse(modelfile_text(model, tokenizer, "m.gguf"))
    assert system == CHAT_TEMPLATES["qwen-2.5"].default_system_message
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_chat_template(tokenizer, "llama-3.1", system_message='Answer in "French".')
    _, template, system, parameters = _parse(modelfile_text(model, tokenizer, "m.gguf"))
    assert system == 'Answer in "French".'
    assert template == CHAT_TEMPLATES["llama-3.1"].ollama
    assert ("stop", '"<|eot_id|>"') in parameters


def test_eos_placeholder_is_filled(tiny):
    model, tokenizer = tiny
    get_chat_template(tokenizer, "mistral")
    _, template, _, parameters = _parse(modelfile_text(model, tokenizer, "m.gguf"))
    assert "{EOS}" not in template and tokenizer.eos_token in template
    assert ("stop", f'"{tokenizer.eos_token}"') in parameters and ("stop", '"[INST]"') in parameters


def test_without_or_with_an_unknown_template(tiny):
    model, _ = tiny
    tokenizer = testing.build_tokenizer(chat_template=None)
    _, template, _, parameters = _parse(modelfile_text(model, tokenizer, "m.gguf"))
    assert template is None and parameters[0] == ("stop", f'"{tokenizer.eos_token}"')
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.warns(UserWarning, match="not one loraforge knows"):
        _, template, _, _ = _parse(modelfile_text(model, tokenizer, "m.gguf"))
    assert template is None
