"""What this machine offers loraforge, and what does not fit together: `loraforge env` and `banner()`.

    from loraforge.env_report import collect, format_report, banner
    print(format_report(collect()))      # the GPU, the library versions, loraforge's CUDA build, warnings
    print(banner())                      # one or two lines, for when a model loads

The report is gathered without importing the heavy libraries: versions come from the installed
packages' metadata, so `loraforge env` also works when one of them is broken or missing. Each
mismatch (a GPU that loraforge's `_core` has no code for, torch built without CUDA on a machine with
an NVIDIA GPU, bitsandbytes missing, ...) becomes one plain warning line that says what to do.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import sys
from pathlib import Path

__all__ = ["EnvReport", "GPUInfo", "banner", "collect", "format_report", "mismatch_warnings"]

# Packages loraforge uses, with the oldest version it supports (pyproject's dependencies). None: any.
PACKAGES = {
    "torch": "2.4",
    "triton": None,
    "bitsandbytes": "0.48",
    "transformers": "4.51",
    "peft": "0.15",
    "trl": "1.0",
    "datasets": "3",
    "gguf": "0.17",
    "llama_cpp_python": None,
}
_DISTRIBUTIONS = {"llama_cpp_python": "llama-cpp-python"}
GIB = 2**30


@dataclasses.dataclass
class GPUInfo:
    index: int
    name: str
    capability: tuple[int, int]
    bf16: bool
    free_bytes: int | None
    total_bytes: int | None

    @property
    def sm(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"


@dataclasses.dataclass
class EnvReport:
    loraforge_version: str
    python: str
    platform: str
    versions: dict[str, str | None]  # package -> version, None when not installed
    torch_cuda: str | None  # the CUDA version torch was built with; None for a CPU-only build
    gpus: list[GPUInfo]
    nvidia_gpu_present: bool  # an NVIDIA GPU exists, whether or not torch can use it
    core_cuda_built: bool
    core_architectures: list[str]
    gpu_supported_by_core: dict[int, bool]  # GPU index -> _core holds code that runs on it
    triton_interpret: bool

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["warnings"] = mismatch_warnings(self)
        return data


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(_DISTRIBUTIONS.get(package, package))
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_gpu_present() -> bool:
    """An NVIDIA GPU on this machine, seen from the driver rather than torch (which may be CPU-only)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


def _gpus() -> list[GPUInfo]:
    import torch

    found = []
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        properties = torch.cuda.get_device_properties(index)
        try:
            free, total = torch.cuda.mem_get_info(index)
        except RuntimeError:  # a GPU in use by another process in exclusive mode, say
            free, total = None, properties.total_memory
        capability = (properties.major, properties.minor)
        # bf16 tensor cores from Ampere (8.0) on; torch.cuda.is_bf16_supported() only asks about the current GPU.
        found.append(GPUInfo(index, properties.name, capability, capability >= (8, 0), free, total))
    return found


def collect() -> EnvReport:
    import torch

    import loraforge
    from loraforge._native import _runs_on, cuda_architectures, cuda_kernels_built

    gpus = _gpus()
    archs = cuda_architectures()
    return EnvReport(
        loraforge_version=loraforge.__version__,
        python=sys.version.split()[0],
        platform=f"{platform.system()} {platform.machine()}",
        versions={package: _version(package) for package in PACKAGES},
        torch_cuda=torch.version.cuda,
        gpus=gpus,
        nvidia_gpu_present=bool(gpus) or _nvidia_gpu_present(),
        core_cuda_built=cuda_kernels_built(),
        core_architectures=archs,
        gpu_supported_by_core={gpu.index: _runs_on(gpu.capability, archs) for gpu in gpus},
        triton_interpret=os.environ.get("TRITON_INTERPRET") == "1",
    )


def _older(version: str, minimum: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) < Version(minimum)
    except InvalidVersion:
        return False


def mismatch_warnings(report: EnvReport) -> list[str]:
    """One line per thing that does not fit, each saying what to do about it."""
    lines = []
    for package, minimum in PACKAGES.items():
        version = report.versions.get(package)
        if version is None:
            continue
        if minimum and _older(version, minimum):
            lines.append(f"{package} {version} is older than loraforge supports (>= {minimum}): "
                         f"pip install -U '{package}>={minimum}'")  # fmt: skip
    if report.versions.get("bitsandbytes") is None:
        lines.append("bitsandbytes is not installed: 4-bit (QLoRA) loading needs it. pip install bitsandbytes")
    for package in ("transformers", "peft", "trl"):
        if report.versions.get(package) is None:
            lines.append(f"{package} is not installed: loraforge trains through it. pip install {package}")
    if report.nvidia_gpu_present and report.torch_cuda is None:
        lines.append("an NVIDIA GPU is present but torch is a CPU-only build: install a CUDA build of torch "
                     "(https://pytorch.org/get-started/locally/)")  # fmt: skip
    elif report.nvidia_gpu_present and not report.gpus:
        lines.append(f"an NVIDIA GPU is present and torch is built for CUDA {report.torch_cuda}, but torch cannot "
                     "use the GPU: check the driver (nvidia-smi) is new enough for that CUDA version")  # fmt: skip
    if report.gpus and not report.core_cuda_built:
        lines.append("a CUDA GPU is present but loraforge's _core was built without CUDA kernels (nvcc was not "
                     "found at install time): its CUDA ops will refuse to run. Reinstall with the CUDA toolkit: "
                     "pip install --no-build-isolation --force-reinstall -C cmake.define.LORAFORGE_CUDA=ON .")  # fmt: skip
    elif report.gpus:
        for gpu in report.gpus:
            if not report.gpu_supported_by_core.get(gpu.index, False):
                lines.append(f"GPU {gpu.index} ({gpu.name}, {gpu.sm}) has no code in loraforge's _core (built for "
                             f"{', '.join(report.core_architectures)}): reinstall with "
                             f"-C cmake.define.LORAFORGE_CUDA_ARCHITECTURES={gpu.capability[0]}{gpu.capability[1]}")  # fmt: skip
    if report.gpus and report.versions.get("triton") is None and report.platform.startswith("Linux"):
        lines.append("triton is not installed: loraforge's fused RoPE, RMSNorm, SwiGLU and cross-entropy kernels "
                     "need it on the GPU. pip install triton")  # fmt: skip
    if report.gpus and report.triton_interpret:
        lines.append("TRITON_INTERPRET=1 is set while a GPU is present: Triton kernels run in the (very slow) "
                     "interpreter. Unset it for training")  # fmt: skip
    for gpu in report.gpus:
        if not gpu.bf16:
            lines.append(f"GPU {gpu.index} ({gpu.name}, {gpu.sm}) has no bfloat16: training runs in float16, "
                         "which is less forgiving of large activations (bf16 needs compute capability 8.0+)")  # fmt: skip
    return lines


def _gib(value: int | None) -> str:
    return "?" if value is None else f"{value / GIB:.1f} GiB"


def format_report(report: EnvReport) -> str:
    build = f"(CUDA {report.torch_cuda})" if report.torch_cuda else "(CPU-only build)"
    rows = [
        ("loraforge", f"{report.loraforge_version} (Python {report.python}, {report.platform})"),
        ("torch", f"{report.versions.get('torch')} {build}"),
    ]
    for gpu in report.gpus:
        capability = f"compute capability {gpu.capability[0]}.{gpu.capability[1]} ({gpu.sm})"
        memory = f"{_gib(gpu.free_bytes)} free of {_gib(gpu.total_bytes)}"
        rows.append((f"GPU {gpu.index}", f"{gpu.name}, {capability}, bf16 {'yes' if gpu.bf16 else 'no'}, {memory}"))
    if not report.gpus:
        seen = " (an NVIDIA GPU is present, but torch cannot use it)" if report.nvidia_gpu_present else ""
        rows.append(("GPU", f"none{seen}: training runs on CPU, fine for the quickstart and tests, slow for real models"))
    core = "CUDA kernels for " + ", ".join(report.core_architectures) if report.core_cuda_built else "CPU kernels only"
    rows.append(("_core", core))
    for gpu in report.gpus:
        runs = report.gpu_supported_by_core.get(gpu.index, False)
        rows.append((f"  on GPU {gpu.index}", "runs (native code or PTX)" if runs else f"no code for {gpu.sm}"))
    for package in PACKAGES:
        if package != "torch":
            rows.append((package, report.versions.get(package) or "not installed"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    warnings = mismatch_warnings(report)
    lines += [f"warning: {line}" for line in warnings] or ["no problems found"]
    return "\n".join(lines)


def banner(report: EnvReport | None = None) -> str:
    """One line on what runs where (two with the first warning), to print when a model loads."""
    report = report or collect()
    if report.gpus:
        gpu = report.gpus[0]
        more = f" (+{len(report.gpus) - 1} more)" if len(report.gpus) > 1 else ""
        where = (f"{gpu.name}{more}, {gpu.sm}, {_gib(gpu.free_bytes)} free, {'bf16' if gpu.bf16 else 'fp16 only'}; "
                 f"CUDA kernels {'built' if report.core_cuda_built else 'missing'}")  # fmt: skip
    else:
        where = "no CUDA GPU, training on CPU"
    line = (f"loraforge {report.loraforge_version}: {where}; torch {report.versions.get('torch')}, "
            f"transformers {report.versions.get('transformers')}, peft {report.versions.get('peft')}")  # fmt: skip
    warnings = mismatch_warnings(report)
    if warnings:
        extra = f" (+{len(warnings) - 1} more)" if len(warnings) > 1 else ""
        line += f"\nloraforge warning: {warnings[0]}{extra}; run `loraforge env` for details"
    return line
