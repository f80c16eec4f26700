"""from_pretrained's placement and its two routes to 4 bits (models/loading.py): loraforge's kernel
after a 16-bit load into host memory, or transformers + bitsandbytes quantizing as the checkpoint is
read (taken when the 16-bit model would not fit in host memory). The two must give the same model."""

import pytest
import torch

from loraforge import FastLanguageModel, testing
from loraforge.models import loading
from loraforge.models import patch as lf_patch

pytest.importorskip("bitsandbytes")


def _state_tensors(state) -> dict[str, torch.Tensor]:
    out = {"absmax": state.absmax, "code": state.code}
    if state.nested:
        out.update({"offset": state.offset, "absmax2": state.state2.absmax, "code2": state.state2.code})
    return out


def _load(path, monkeypatch, streamed: bool):
    with monkeypatch.context() as m:
        m.setattr(loading, "stream_quantize", lambda config, dtype: streamed)
        return FastLanguageModel.from_pretrained(path, dtype=torch.float32, load_in_4bit=True)[0]


@pytest.mark.parametrize("arch", testing.ARCHITECTURES)
def test_streamed_4bit_load_equals_the_kernel_load(saved_models, monkeypatch, arch):
    """Same parameters bit for bit (packed codes, 16-bit norms and embeddings), same NF4 statistics,
    the same layers quantized; and after get_peft_model the same loss and LoRA gradients."""
    ours = _load(saved_models[arch], monkeypatch, streamed=False)
    streamed = _load(saved_models[arch], monkeypatch, streamed=True)
    assert getattr(streamed.config, "quantization_config", None) is not None  # it really took the other route
    assert getattr(ours.config, "quantization_config", None) is None

    a, b = dict(ours.named_parameters()), dict(streamed.named_parameters())
    assert a.keys() == b.keys()
    quantized = 0
    for name, param in a.items():
        other = b[name]
        assert param.dtype == other.dtype and param.shape == other.shape, name
        assert torch.equal(param.data, other.data), name
        if param.dtype == torch.uint8:
            quantized += 1
            sa, sb = _state_tensors(param.quant_state), _state_tensors(other.quant_state)
            assert sa.keys() == sb.keys(), name
            for key in sa:
                assert torch.equal(sa[key], sb[key]), f"{name} {key}"
            assert param.quant_state.blocksize == other.quant_state.blocksize
            assert tuple(param.quant_state.shape) == tuple(other.quant_state.shape)
    assert quantized == 7 * ours.config.num_hidden_layers  # every projection, never the head
    assert streamed.is_loaded_in_4bit and ours.is_loaded_in_4bit

    losses, grads = [], []
    for model in (ours, streamed):
        peft = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0,
                                                use_gradient_checkpointing=False)  # fmt: skip
        # loraforge's fused path takes the streamed model's projections as it takes its own.
        assert all(lf_patch.lora_projection(m) is not None for n, m in peft.named_modules()
                   if n.endswith(("q_proj", "down_proj")) and hasattr(m, "lora_A"))  # fmt: skip
        for name, param in peft.named_parameters():  # a non-zero B, so every LoRA gradient is non-trivial
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1
        ids = torch.randint(4, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
        loss = peft(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in peft.named_parameters() if p.requires_grad})
    assert torch.equal(losses[0], losses[1])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=0, msg=name)


def test_stream_quantize_when_the_16bit_model_does_not_fit(saved_models, monkeypatch):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(saved_models["llama"])
    size = loading.sixteen_bit_bytes(config, torch.bfloat16)
    expected = sum(p.numel() for p in FastLanguageModel.from_pretrained(
        saved_models["llama"], dtype=torch.float32, load_in_4bit=False)[0].parameters()) * 2  # fmt: skip
    assert size == expected
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(loading, "available_host_memory", lambda: int(size / loading.HOST_MEMORY_SHARE) + 1)
    assert not loading.stream_quantize(config, torch.bfloat16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this host, each loading its copy
    assert loading.stream_quantize(config, torch.bfloat16)
    monkeypatch.setattr(loading, "available_host_memory", lambda: None)  # unknown: keep the default route
    assert not loading.stream_quantize(config, torch.bfloat16)
    monkeypatch.setattr(loading, "available_host_memory", lambda: 1 << 50)
    monkeypatch.setattr(loading, "sixteen_bit_bytes", lambda *a: (_ for _ in ()).throw(ValueError("remote code")))
    assert not loading.stream_quantize(config, torch.bfloat16)


def test_available_host_memory_reads_meminfo():
    available = loading.available_host_memory()
    assert available is None or 0 < available < 1 << 50


def test_streamed_load_refuses_a_second_quantization_config():
    with pytest.raises(ValueError, match="quantization_config"):
        loading.streamed_4bit_arguments(torch.bfloat16, "cpu", {"quantization_config": object()})


def _fake_cuda(monkeypatch, count: int, current: int = 0):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)


def test_each_launched_process_loads_onto_its_own_gpu(monkeypatch):
    """torchrun / accelerate: LOCAL_RANK picks the GPU, and device_map='auto' (which would spread the
    model over all GPUs in every process) becomes that GPU; explicit maps are kept."""
    _fake_cuda(monkeypatch, count=4, current=0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    device = loading.load_device("auto")
    assert device == "cuda:3"
    assert loading.transformers_device_map("auto", device) == {"": "cuda:3"}
    assert loading.transformers_device_map(None, device) == {"": "cuda:3"}
    assert loading.transformers_device_map({"": "cuda:1"}, device) == {"": "cuda:1"}
    assert loading.transformers_device_map("sequential", device) == "sequential"
    assert loading.load_device(None) == "cpu"
    # One GPU per process (CUDA_VISIBLE_DEVICES set by the launcher): LOCAL_RANK is past the count.
    _fake_cuda(monkeypatch, count=1, current=0)
    assert loading.load_device("auto") == "cuda:0"


def test_a_single_process_keeps_device_map_auto(monkeypatch):
    _fake_cuda(monkeypatch, count=2, current=1)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert loading.load_device("auto") == "cuda:1"
    assert loading.transformers_device_map("auto", "cuda:1") == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loading.load_device("auto") == "cpu"
