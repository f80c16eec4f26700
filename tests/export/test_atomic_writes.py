"""Exports are all-or-nothing: no overwriting by accident, no partial files, a clear disk-full error."""

import collections
import os

import pytest
from loraforge import testing
from loraforge.export import gguf_convert, merge, save_pretrained_gguf, save_pretrained_merged

SIZES = {"hidden_size": 256, "intermediate_size": 512}


@pytest.fixture(scope="module")
def tiny():
    return testing.tiny_model_and_tokenizer("llama", seed=0, **SIZES)


def _listing(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def _fail_after(calls, error=None):
    """A stand-in that calls fail.original `calls` times, then raises `error`."""
    error = error or RuntimeError("simulated failure")
    count = collections.Counter()

    def fail(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise error
        return fail.original(*args, **kwargs)

    return fail


def test_gguf_existing_files_are_refused_before_anything_is_written(tiny, tmp_path):
    model, tokenizer = tiny
    (tmp_path / "out.Q4_K_M.gguf").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pretrained_gguf(model, tmp_path, tokenizer, ["q8_0", "q4_k_m"], model_name="out")
    assert _listing(tmp_path) == ["out.Q4_K_M.gguf"]
    paths = save_pretrained_gguf(model, tmp_path, tokenizer, ["q8_0", "q4_k_m"], model_name="out", overwrite=True)
    assert [os.path.basename(p) for p in paths] == ["out.Q8_0.gguf", "out.Q4_K_M.gguf"]
    assert (tmp_path / "out.Q4_K_M.gguf").read_bytes()[:4] == b"GGUF"
    assert _listing(tmp_path) == ["Modelfile", "out.Q4_K_M.Modelfile", "out.Q4_K_M.gguf", "out.Q8_0.Modelfile",
                                  "out.Q8_0.gguf"]  # fmt: skip


@pytest.mark.parametrize("error", (RuntimeError("simulated failure"), KeyboardInterrupt()), ids=("error", "ctrl-c"))
def test_gguf_failure_leaves_no_partial_file(tiny, tmp_path, monkeypatch, error):
    model, tokenizer = tiny
    (tmp_path / "out.Q8_0.gguf").write_bytes(b"old")
    failing = _fail_after(7, error)
    failing.original = gguf_convert.encode_tensor
    monkeypatch.setattr(gguf_convert, "encode_tensor", failing)
    with pytest.raises(type(error)):
        save_pretrained_gguf(model, tmp_path, tokenizer, ["q8_0", "f16"], model_name="out", overwrite=True)
    assert _listing(tmp_path) == ["out.Q8_0.gguf"]  # no temporaries, no half-written F16 file
    assert (tmp_path / "out.Q8_0.gguf").read_bytes() == b"old"


def test_gguf_checks_free_space_first(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("loraforge.export.atomic.shutil.disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(OSError, match="not enough disk space for 2 GGUF file"):
        save_pretrained_gguf(model, tmp_path / "new", tokenizer, ["f32", "q8_0"])
    assert not (tmp_path / "new").exists()
    with pytest.raises(OSError, match="not enough disk space for the merged_16bit checkpoint"):
        save_pretrained_merged(model, tmp_path / "merged", tokenizer)
    assert _listing(tmp_path) == []


def test_merged_directory_is_replaced_only_on_request_and_only_whole(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    target = tmp_path / "merged"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        save_pretrained_merged(model, target, tokenizer)
    failing = _fail_after(3)
    failing.original = merge._ShardWriter.add
    monkeypatch.setattr(merge._ShardWriter, "add", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        save_pretrained_merged(model, target, tokenizer, overwrite=True)
    assert _listing(tmp_path) == ["merged"] and _listing(target) == ["notes.txt"]
    monkeypatch.undo()
    save_pretrained_merged(model, target, tokenizer, overwrite=True)
    assert "notes.txt" not in _listing(target) and "model.safetensors" in _listing(target)
    assert _listing(tmp_path) == ["merged"]


def test_target_that_is_a_file_or_folder_of_the_wrong_kind(tiny, tmp_path):
    model, tokenizer = tiny
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        save_pretrained_gguf(model, tmp_path / "file", tokenizer)
    with pytest.raises(NotADirectoryError):
        save_pretrained_merged(model, tmp_path / "file", tokenizer)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        save_pretrained_gguf(model, tmp_path / "g", None)
