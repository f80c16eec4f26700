"""With LORAFORGE_EXPANDABLE_SEGMENTS=1, import loraforge asks CUDA's allocator for expandable segments unless the
user configured it (_allocator.py).
Each case imports loraforge in a fresh interpreter, since the setting is made at import."""

import os
import subprocess
import sys
import types

import pytest

from loraforge import _allocator


def _conf_after_import(env: dict) -> str:
    base = {k: v for k, v in os.environ.items()
            if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "LORAFORGE_EXPANDABLE_SEGMENTS")}  # fmt: skip
    code = "import os, loraforge; print(repr(os.environ.get('PYTORCH_CUDA_ALLOC_CONF')))"
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "None"),  # off by default
        ({"LORAFORGE_EXPANDABLE_SEGMENTS": "0"}, "None"),
        ({"LORAFORGE_EXPANDABLE_SEGMENTS": "1"}, "'expandable_segments:True'"),
        (
            {"LORAFORGE_EXPANDABLE_SEGMENTS": "1", "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"},
            "'max_split_size_mb:128'",
        ),  # the user's wins
        (
            {"LORAFORGE_EXPANDABLE_SEGMENTS": "1", "PYTORCH_ALLOC_CONF": "expandable_segments:False"},
            "None",
        ),  # (torch's newer name counts too)
    ],
)
def test_import_sets_expandable_segments_on_request_unless_configured(env, expected):
    assert _conf_after_import(env) == expected


def test_nothing_is_set_once_cuda_is_up(monkeypatch):
    """A process whose allocator started already keeps it: setting the variable then would only mislead."""
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv("LORAFORGE_EXPANDABLE_SEGMENTS", "1")
    started = types.SimpleNamespace(cuda=types.SimpleNamespace(is_initialized=lambda: True))
    monkeypatch.setitem(sys.modules, "torch", started)
    assert not _allocator.prefer_expandable_segments()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    monkeypatch.setitem(
        sys.modules, "torch", types.SimpleNamespace(cuda=types.SimpleNamespace(is_initialized=lambda: False))
    )
    assert _allocator.prefer_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
