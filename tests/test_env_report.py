"""`loraforge env` and banner(): the report on this (CPU) machine, and the warning for each mismatch."""

import dataclasses
import json

import pytest
import torch
from loraforge import cli, env_report
from loraforge.env_report import EnvReport, GPUInfo, banner, format_report, mismatch_warnings

H100 = GPUInfo(0, "NVIDIA H100 80GB HBM3", (9, 0), True, 70 * 2**30, 80 * 2**30)
T4 = GPUInfo(0, "Tesla T4", (7, 5), False, 14 * 2**30, 15 * 2**30)


def gpu_report(**changes) -> EnvReport:
    """A healthy H100 machine; `changes` break one thing at a time."""
    report = EnvReport(
        loraforge_version="0.1.0", python="3.11.7", platform="Linux x86_64",
        versions={"torch": "2.13.0+cu130", "triton": "3.9.0", "bitsandbytes": "0.50.2", "transformers": "5.24.0",
                  "peft": "0.21.2", "trl": "1.15.0", "datasets": "4.0.0", "gguf": "0.17.1", "llama_cpp_python": None},
        torch_cuda="13.0", gpus=[H100], nvidia_gpu_present=True, core_cuda_built=True,
        core_architectures=["80-real", "86-real", "89-real", "90"], gpu_supported_by_core={0: True},
        triton_interpret=False,
    )  # fmt: skip
    return dataclasses.replace(report, **changes)


def test_collect_on_this_machine():
    report = env_report.collect()
    assert report.versions["torch"] == torch.__version__.split("+")[0] or report.versions["torch"] == torch.__version__
    assert report.core_cuda_built == __import__("loraforge").cuda_kernels_built()
    text = format_report(report)
    for name in ("loraforge", "torch", "GPU", "_core", "triton", "bitsandbytes", "transformers", "peft", "trl"):
        assert name in text
    if not torch.cuda.is_available():
        assert report.gpus == [] and "training runs on CPU" in text


def test_a_healthy_gpu_machine_has_no_warnings():
    report = gpu_report()
    assert mismatch_warnings(report) == []
    text = format_report(report)
    assert "compute capability 9.0 (sm_90), bf16 yes, 70.0 GiB free of 80.0 GiB" in text
    assert "no problems found" in text
    line = banner(report)
    assert "\n" not in line and "NVIDIA H100" in line and "sm_90" in line and "CUDA kernels built" in line


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"core_cuda_built": False, "core_architectures": [], "gpu_supported_by_core": {0: False}},
         "built without CUDA kernels"),
        ({"core_architectures": ["80-real", "86-real"], "gpu_supported_by_core": {0: False}},
         "LORAFORGE_CUDA_ARCHITECTURES=90"),
        ({"gpus": [], "torch_cuda": None, "gpu_supported_by_core": {}}, "torch is a CPU-only build"),
        ({"gpus": [], "gpu_supported_by_core": {}}, "torch cannot use the GPU"),
        ({"versions": {**gpu_report().versions, "bitsandbytes": None}}, "bitsandbytes is not installed"),
        ({"versions": {**gpu_report().versions, "transformers": "4.40.0"}}, "transformers 4.40.0 is older"),
        ({"versions": {**gpu_report().versions, "triton": None}}, "triton is not installed"),
        ({"triton_interpret": True}, "TRITON_INTERPRET=1"),
        ({"gpus": [T4]}, "has no bfloat16"),
    ],
)
def test_each_mismatch_gives_one_warning(changes, expected):
    report = gpu_report(**changes)
    warnings = mismatch_warnings(report)
    assert len(warnings) == 1 and expected in warnings[0], warnings
    assert f"warning: {warnings[0]}" in format_report(report)
    first, second = banner(report).split("\n")
    assert first.startswith("loraforge 0.1.0") and "loraforge env" in second


def test_cpu_only_machine_banner():
    report = gpu_report(gpus=[], nvidia_gpu_present=False, torch_cuda=None, core_cuda_built=False,
                        core_architectures=[], gpu_supported_by_core={})  # fmt: skip
    assert mismatch_warnings(report) == []
    assert banner(report).startswith("loraforge 0.1.0: no CUDA GPU, training on CPU")


def test_env_command_json(capsys):
    assert cli.main(["env", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["loraforge_version"] and "torch" in data["versions"] and isinstance(data["warnings"], list)
