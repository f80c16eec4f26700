"""save_pretrained_gguf packs on the GPU or the CPU (pack_device); the files are the same bytes either way."""

import numpy as np
import pytest
import torch
from loraforge import gguf as lf_gguf
from loraforge import testing
from loraforge.export import save_pretrained_gguf
from loraforge.export.gguf_convert import encode_tensor, resolve_pack_device

pytest.importorskip("gguf")

MIXES = ["f16", "q8_0", "q4_0", "q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k"]
CASES = {
    "llama": ("llama", {"hidden_size": 256, "intermediate_size": 512, "num_layers": 3}),
    # rows of 288 and 576: the Q5_0 / Q5_1 / Q8_0 / Q4_0 fallbacks, packed on the CPU beside GPU tensors
    "qwen2-odd-rows": ("qwen2", {"hidden_size": 288, "intermediate_size": 576, "num_layers": 2, "num_heads": 8,
                                 "num_kv_heads": 2}),
}  # fmt: skip


def _export(model, tokenizer, folder, pack_device):
    paths = save_pretrained_gguf(model, folder, tokenizer, MIXES, write_modelfile=False, model_name="m",
                                 pack_device=pack_device)  # fmt: skip
    return {path.rsplit(".", 2)[-2]: open(path, "rb").read() for path in paths}


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_gpu_and_cpu_packing_write_the_same_files(tmp_path, case):
    arch, sizes = CASES[case]
    model, tokenizer = testing.tiny_model_and_tokenizer(arch, seed=3, **sizes)
    on_cpu = _export(model, tokenizer, tmp_path / "cpu", "cpu")
    moved = _export(model, tokenizer, tmp_path / "moved", "cuda")  # CPU model, tensors moved to the GPU
    model = model.to("cuda")
    auto = _export(model, tokenizer, tmp_path / "auto", "auto")  # GPU model, packed where it is
    for name, data in on_cpu.items():
        assert moved[name] == data, f"{case} {name}: GPU packing (CPU model) wrote different bytes"
        assert auto[name] == data, f"{case} {name}: GPU packing (GPU model) wrote different bytes"


@pytest.mark.gpu
def test_bf16_model_on_gpu(tmp_path):
    model, tokenizer = testing.tiny_model_and_tokenizer("llama", seed=4, dtype=torch.bfloat16, **CASES["llama"][1])
    on_cpu = _export(model, tokenizer, tmp_path / "cpu", "cpu")
    on_gpu = _export(model.to("cuda"), tokenizer, tmp_path / "gpu", "cuda:0")
    assert on_gpu == on_cpu


@pytest.mark.gpu
def test_encode_tensor_takes_cuda_tensors():
    x = torch.randn(6, 512) * 3
    for type_name in ("Q4_K", "Q6_K", "Q8_0", "F16", "Q5_0"):
        np.testing.assert_array_equal(encode_tensor(x.cuda(), type_name), encode_tensor(x.numpy(), type_name))


# ---- no GPU needed --------------------------------------------------------------------------------


def test_resolve_pack_device():
    assert resolve_pack_device("cpu") is None
    assert resolve_pack_device(torch.device("cpu")) is None
    for bad in ("tpu", "meta", 3.5, "cuda:x"):
        with pytest.raises(ValueError, match="pack_device must be"):
            resolve_pack_device(bad)
    if torch.cuda.is_available():
        assert resolve_pack_device("auto").type == "cuda"
        assert resolve_pack_device("cuda") == torch.device("cuda", torch.cuda.current_device())
    else:
        assert resolve_pack_device("auto") is None and resolve_pack_device(None) is None
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_pack_device("cuda")


def test_encode_tensor_takes_cpu_tensors():
    x = torch.randn(4, 512)
    for type_name in ("Q4_K", "F32", "BF16", "Q5_1"):
        np.testing.assert_array_equal(encode_tensor(x, type_name), encode_tensor(x.numpy(), type_name))
    np.testing.assert_array_equal(encode_tensor(x[:, None, :], "Q6_K"), lf_gguf.quantize(x.numpy(), "Q6_K"))
