"""The compiled core: how it loads, what it reports, and the errors it gives."""

import subprocess
import sys

import pytest
import torch

import loraforge
from loraforge import _core, _native


def test_import_without_gpu_and_core_reports_its_build():
    assert isinstance(loraforge.cuda_kernels_built(), bool)
    archs = loraforge.cuda_architectures()
    assert archs == [] or all(arch[:2].isdigit() for arch in archs)
    assert _core.nf4_levels() == list(loraforge.ops.nf4.NF4_LEVELS)


def test_core_links_no_torch_library():
    if sys.platform != "linux":
        pytest.skip("ldd is Linux-only")
    linked = subprocess.run(["ldd", _core.__file__], capture_output=True, text=True).stdout
    # Library names only: the load addresses ldd prints are random hex, which can contain "c10".
    names = [line.split()[0] for line in linked.splitlines() if line.strip()]
    assert names and not any("torch" in name or name.startswith("libc10") for name in names), names
    assert "libcudart.so" not in linked  # the CUDA runtime is linked statically


def test_ops_are_registered():
    for name in ("nf4_quantize", "nf4_dequantize", "nf4_dequantize_nested"):
        assert hasattr(torch.ops.loraforge, name)


def test_missing_cuda_kernels_give_a_rebuild_message(monkeypatch):
    monkeypatch.setattr(_native, "cuda_kernels_built", lambda: False)
    _native._require_cuda_kernels.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="built without CUDA kernels.*LORAFORGE_CUDA=ON"):
            _native._require_cuda_kernels(0)
    finally:
        _native._require_cuda_kernels.cache_clear()


def test_core_cuda_entry_points_raise_python_errors():
    """Whether or not CUDA was built, a CUDA call here (no GPU) raises, never crashes."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError):
        _core.nf4_dequantize_cuda(1, 1, 64, 64, 1, 0, 0)


@pytest.mark.parametrize(
    ("capability", "archs", "ok"),
    [
        ((9, 0), ["80-real", "86-real", "89-real", "90"], True),
        ((8, 6), ["80-real", "86-real", "89-real", "90"], True),
        ((7, 5), ["80-real", "86-real", "89-real", "90"], False),
        ((10, 0), ["80-real", "86-real", "89-real", "90"], True),  # PTX for sm_90 JITs forward
        ((10, 0), ["90-real"], False),
    ],
)
def test_architecture_matching(capability, archs, ok):
    assert _native._runs_on(capability, archs) is ok


def test_cli_demo_runs(capsys):
    from loraforge import cli

    assert cli.main(["demo", "--steps", "15"]) == 0
    out = capsys.readouterr().out
    assert "bit-exact with bitsandbytes: True" in out and "loss" in out
    assert cli.main(["demo", "--steps", "0"]) == 2  # a usage error: exit status 2, with a message
    assert "--steps" in capsys.readouterr().err


def test_cuda_on_without_nvcc_is_a_configure_error(tmp_path):
    import os
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cmake = shutil.which("cmake")
    if cmake is None or not (root / "CMakeLists.txt").exists():
        pytest.skip("needs cmake and the source tree")
    env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "CUDA_PATH", "CUDA_HOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not Path(p, "nvcc").exists())
    env["CUDA_PATH"] = str(tmp_path / "no-cuda")
    if shutil.which("nvcc", path=env["PATH"]) is not None:
        pytest.skip("nvcc could not be hidden")
    result = subprocess.run([cmake, "-S", str(root), "-B", str(tmp_path / "build"), "-DLORAFORGE_CUDA=ON"],
                            capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert result.returncode != 0
    assert "LORAFORGE_CUDA=ON but no CUDA compiler was found" in result.stdout + result.stderr
