"""Chat templates, dataset formats and response-only masking for supervised fine-tuning.

The pieces, in the order a notebook uses them:

* `standardize_sharegpt`: ShareGPT "from"/"value" conversations -> "role"/"content" messages.
* `get_chat_template`: put a model family's chat format (from one table, `templates.CHAT_TEMPLATES`)
  on a tokenizer, with the matching end-of-turn token as eos.
* `train_on_responses_only`: after a trainer is built, set labels so only assistant replies count
  in the loss (`mask_non_responses` does it for one token sequence).
* `chat_template_problems`: a template of another model family, or an end-of-turn token generation
  does not stop on (loraforge's SFT and GRPO trainers warn about these as training starts).

`datasets` is needed only for `datasets.Dataset` inputs; plain lists of dicts work without it.
"""

from loraforge.data.chat_templates import (
    DEFAULT_MAPPING,
    build_jinja,
    detect_chat_template,
    get_chat_template,
)
from loraforge.data.response_only import mask_non_responses, train_on_responses_only
from loraforge.data.sharegpt import standardize_sharegpt
from loraforge.data.template_check import (
    chat_template_problems,
    warn_on_chat_template_problems,
)
from loraforge.data.templates import (
    CHAT_TEMPLATES,
    EOS_PLACEHOLDER,
    ChatTemplate,
    lookup_template,
    template_names,
)

__all__ = [
    "CHAT_TEMPLATES",
    "DEFAULT_MAPPING",
    "EOS_PLACEHOLDER",
    "ChatTemplate",
    "build_jinja",
    "chat_template_problems",
    "detect_chat_template",
    "get_chat_template",
    "lookup_template",
    "mask_non_responses",
    "standardize_sharegpt",
    "template_names",
    "train_on_responses_only",
    "warn_on_chat_template_problems",
]
