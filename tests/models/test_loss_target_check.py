"""LORAFORGE_CHECK_TARGETS_AHEAD=1: the training loss checks its targets ahead of the backbone
(ops/cross_entropy.py, targets_checked_ahead). Bad labels still raise, the fused cross-entropy inside skips
its own check of the same targets, and any other targets (another tensor, changed in place, other classes)
are checked by the op as before. On CUDA (`gpu`) the check is queued once, before the forward, and the model
trains on after a refusal."""

import pytest
import torch

from loraforge import testing
from loraforge.ops import cross_entropy as ce
from loraforge.ops import fused_linear_cross_entropy as flce
from tests.models._lora_runs import load_with_adapters

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")


@pytest.fixture
def checks(monkeypatch):
    """Every target check that actually runs: the targets' element count each time."""
    seen = []
    real = ce._bad_targets

    def counted(targets, n_classes, ignore_index):
        seen.append(targets.numel())
        return real(targets, n_classes, ignore_index)

    monkeypatch.setattr(ce, "_bad_targets", counted)
    return seen


def _inputs(rows=37, hidden=24, vocab=101):
    x = torch.randn(rows, hidden, requires_grad=True)
    return x, torch.randn(vocab, hidden), torch.randint(0, vocab, (rows,))


def test_the_op_skips_only_the_check_of_the_targets_checked_ahead(checks):
    x, w, t = _inputs()
    with ce.targets_checked_ahead(t, w.shape[0], -100):
        assert checks == [t.numel()]
        flce.fused_linear_cross_entropy(x, w, t)  # the same tensor
        flce.fused_linear_cross_entropy(x.view(1, *x.shape), w, t.view(1, -1))  # a view of the same elements
        assert checks == [t.numel()]
        flce.fused_linear_cross_entropy(x, w, t.clone())  # other elements
        flce.fused_linear_cross_entropy(x, w[:-1], t.clamp(max=w.shape[0] - 2))  # other classes (and tensor)
        assert checks == [t.numel()] * 3
        flce.fused_linear_cross_entropy(x, w, t, ignore_index=-1)  # another ignore index
        t.add_(0)  # changed in place: its version moves on
        flce.fused_linear_cross_entropy(x, w, t)
        assert checks == [t.numel()] * 5
    flce.fused_linear_cross_entropy(x, w, t)  # after the block: checked again
    assert checks == [t.numel()] * 6


def test_bad_targets_checked_ahead_still_raise():
    x, w, t = _inputs()
    t[5] = w.shape[0]
    with pytest.raises(ValueError, match=f"found {w.shape[0]}"), ce.targets_checked_ahead(t, w.shape[0], -100):
        flce.fused_linear_cross_entropy(x, w, t)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_model_loss_checks_its_labels_once_ahead_and_refuses_bad_ones(tmp_path, device, checks, monkeypatch):
    from loraforge.models import causal_lm_loss

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setattr(causal_lm_loss, "CHECK_TARGETS_AHEAD", True)  # (LORAFORGE_CHECK_TARGETS_AHEAD=1)
    path = testing.save_tiny_model(tmp_path / "llama", arch="llama", seed=2, num_hidden_layers=2)
    model, tokenizer = load_with_adapters(path, device_map="auto" if device == "cuda" else None)
    model.train()
    vocab = model.get_output_embeddings().weight.shape[0]
    batch = tokenizer(["Snow is white and cold.", "A dog ran"], return_tensors="pt", padding=True).to(device)
    pending = []
    if device == "cuda":  # the CUDA checks queued: one a forward, begun before the backbone's first layer
        real = ce._PendingTargetCheck
        layers = model.base_model.model.model.layers
        started = []
        layers[0].register_forward_pre_hook(lambda module, args: started.append(len(pending)))

        def recorded(*args):
            pending.append(real(*args))
            return pending[-1]

        monkeypatch.setattr(ce, "_PendingTargetCheck", recorded)
    loss = model(**batch, labels=batch["input_ids"]).loss
    if device == "cuda":
        assert len(pending) == 1 and started == [1]  # (before the backward, whose rerun calls the layer again)
    loss.backward()
    assert torch.isfinite(loss) and checks == [batch["input_ids"].numel()]
    for bad in (vocab, -7):
        labels = batch["input_ids"].clone()
        labels[1, 3] = bad
        with pytest.raises(ValueError, match=f"found {bad}"):
            model(**batch, labels=labels)
    loss_again = model(**batch, labels=batch["input_ids"]).loss  # the device is fine after a refusal
    loss_again.backward()
    assert torch.isfinite(loss_again)
