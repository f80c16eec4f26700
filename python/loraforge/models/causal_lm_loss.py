"""The training forward of *ForCausalLM with loraforge's fused linear cross-entropy.

transformers' forward projects every position through the lm_head ([batch, seq, vocab] logits,
upcast to fp32 inside its loss: for Llama 3 at 2 x 2,048 tokens that is 4 GiB) and then takes the
cross-entropy. While training with labels we run the backbone as it is and hand its last hidden
states and the lm_head weight to `fused_linear_cross_entropy`, which never holds the logits. The
loss is transformers' own: labels shifted by one (pre-shifted `shift_labels` taken as they are),
ignore index -100, summed over the batch and divided by `num_items_in_batch` when the trainer
passes it (exact gradient accumulation), else the mean; Gemma 2's final logit softcapping
included. Generation, evaluation and any call without labels take the stock forward unchanged.
"""

from __future__ import annotations

import contextlib
import os

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from loraforge.ops.cross_entropy import targets_checked_ahead
from loraforge.ops.fused_linear_cross_entropy import fused_linear_cross_entropy

IGNORE_INDEX = -100
# Whether the loss checks its targets before the backbone runs (LORAFORGE_CHECK_TARGETS_AHEAD=1) rather than at
# its end. At its end (the default) the check's verdict is read behind the whole forward on the GPU, so the host
# waits there for the forward to finish before it issues the backward. Ahead, the host goes straight on into
# the backward. Not the default until measured: the 8B step's memory peaks around the loss and the start of the
# backward, and a host further ahead of the GPU there holds more freed blocks that the GPU still reads
# (record_stream); the peak has 0.23 GiB to spare against Unsloth's.
CHECK_TARGETS_AHEAD = os.environ.get("LORAFORGE_CHECK_TARGETS_AHEAD", "0") == "1"


def _plain_head(model) -> torch.nn.Module | None:
    """The lm_head as a plain Linear (not LoRA-wrapped, not quantized), or None."""
    head = model.get_output_embeddings()
    return head if type(head) is torch.nn.Linear else None


def fused_loss_forward(self, *args, labels=None, **kwargs):
    head = _plain_head(self)
    if labels is None or not self.training or head is None or kwargs.get("logits_to_keep", 0) not in (0, None):
        return type(self).forward(self, *args, labels=labels, **kwargs)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    kwargs.pop("logits_to_keep", None)
    kwargs["use_cache"] = False
    if shift_labels is None:
        # Position t predicts token t+1; the last position has nothing to predict.
        shift_labels = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    targets = shift_labels.to(head.weight.device)
    # CHECK_TARGETS_AHEAD: the targets' check goes ahead of the backbone; read at the end of the loss, it no
    # longer makes the host wait for the GPU to finish the forward (ops/cross_entropy.py, targets_checked_ahead).
    ahead = CHECK_TARGETS_AHEAD and targets.dtype == torch.int64 and not torch.compiler.is_compiling()
    checked = targets_checked_ahead(targets, head.weight.shape[0], IGNORE_INDEX) if ahead else contextlib.nullcontext()
    with checked:
        outputs = self.model(*args, **kwargs)
        hidden = outputs.last_hidden_state
        loss = fused_linear_cross_entropy(
            hidden, head.weight, targets, head.bias, ignore_index=IGNORE_INDEX,
            reduction="sum" if num_items_in_batch is not None else "mean", num_items_in_batch=num_items_in_batch,
            softcap=getattr(self.config, "final_logit_softcapping", None) or None,
        )  # fmt: skip
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                  attentions=outputs.attentions)  # fmt: skip
