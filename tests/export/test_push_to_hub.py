"""push_to_hub_merged / push_to_hub_gguf against a stand-in for huggingface_hub.HfApi.

The stand-in records every call and copies the folder upload_folder is given (names and bytes) at
the moment of the upload, so the tests compare what would have gone to the Hub with what a local
save_pretrained_merged / save_pretrained_gguf writes, and check that the temporary folder is gone
afterwards, on success and on every failure.
"""

import hashlib
import tempfile
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import CommitInfo, RepoUrl
from huggingface_hub.errors import LocalTokenNotFoundError
from loraforge import testing
from loraforge.export import (
    attach_export_methods,
    hub,
    push_to_hub_gguf,
    push_to_hub_merged,
    save_pretrained_gguf,
    save_pretrained_merged,
)

peft = pytest.importorskip("peft")

USER = "fake-user"  # the namespace the fake Hub gives a bare repository name
OID = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """What the code under test asked of the Hub, and what it would have uploaded."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.failures: dict[str, BaseException] = {}  # method name -> exception it raises
        self.folder: Path | None = None
        self.files: dict[str, bytes] = {}

    def names(self):
        return [name for name, _ in self.calls]

    def kwargs(self, method):
        (found,) = [kwargs for name, kwargs in self.calls if name == method]
        return found


@pytest.fixture
def fake_hub(monkeypatch):
    record = FakeHub()

    class FakeHfApi:
        def __init__(self, *args, **kwargs):
            record.calls.append(("HfApi", kwargs))

        def create_repo(self, repo_id, **kwargs):
            record.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            if "create_repo" in record.failures:
                raise record.failures["create_repo"]
            full = repo_id if "/" in repo_id else f"{USER}/{repo_id}"
            return RepoUrl(f"https://huggingface.co/{full}")

        def upload_folder(self, **kwargs):
            record.calls.append(("upload_folder", kwargs))
            folder = Path(kwargs["folder_path"])
            record.folder = folder
            record.files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
            if "upload_folder" in record.failures:
                raise record.failures["upload_folder"]
            url = f"https://huggingface.co/{kwargs['repo_id']}/commit/{OID}"
            return CommitInfo(commit_url=url, commit_message=kwargs["commit_message"],
                              commit_description=kwargs.get("commit_description") or "", oid=OID)  # fmt: skip

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    # The machine's own login (if any) must not decide a test: no stored token unless a test sets one.
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return record


@pytest.fixture(scope="module")
def lora():
    """A tiny Llama with LoRA adapters that change its output (B is not zero)."""
    model, tokenizer = testing.tiny_model_and_tokenizer("llama", seed=3)
    config = peft.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        model = peft.get_peft_model(model, config)
    return model, tokenizer


def _digests(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def _local(folder: Path) -> dict[str, str]:
    return _digests({p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()})


def _assert_cleaned_up(fake_hub, staging: Path):
    assert fake_hub.folder is not None and fake_hub.folder.is_relative_to(staging)
    assert not fake_hub.folder.exists()
    assert list(staging.iterdir()) == []  # the temporary root around the export is gone too


@pytest.mark.parametrize("save_method", ["merged_16bit", "lora"])
def test_merged_uploads_what_a_local_save_writes(lora, fake_hub, tmp_path, save_method):
    model, tokenizer = lora
    staging = tmp_path / "staging"
    result = push_to_hub_merged(
        model, "someone/tiny-merged", tokenizer, save_method, token="hf_given", private=True,
        commit_message="first upload", commit_description="a test push", revision="main", create_pr=True,
        temporary_location=staging,
    )  # fmt: skip
    local = save_pretrained_merged(model, tmp_path / "local", tokenizer, save_method)
    assert _digests(fake_hub.files) == _local(Path(local))
    expected = {"model.safetensors", "config.json"} if save_method == "merged_16bit" else {"adapter_config.json"}
    assert expected <= set(fake_hub.files) and "tokenizer.json" in fake_hub.files

    assert fake_hub.names() == ["HfApi", "create_repo", "upload_folder"]
    assert fake_hub.kwargs("create_repo") == {"repo_id": "someone/tiny-merged", "token": "hf_given", "private": True,
                                              "repo_type": "model", "exist_ok": True}  # fmt: skip
    upload = fake_hub.kwargs("upload_folder")
    assert (upload["repo_id"], upload["token"], upload["repo_type"]) == ("someone/tiny-merged", "hf_given", "model")
    assert (upload["commit_message"], upload["commit_description"]) == ("first upload", "a test push")
    assert (upload["revision"], upload["create_pr"]) == ("main", True)
    assert isinstance(result, CommitInfo) and result.oid == OID
    assert result.repo_url.repo_id == "someone/tiny-merged"
    _assert_cleaned_up(fake_hub, staging)


def test_gguf_uploads_files_modelfiles_and_a_model_card(lora, fake_hub, tmp_path, monkeypatch):
    model, tokenizer = lora
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_stored")  # what `hf auth login` leaves
    monkeypatch.setattr(model.peft_config["default"], "base_model_name_or_path", "meta-llama/Llama-3.2-1B")
    staging = tmp_path / "staging"
    # A bare name: the Hub puts it in the token owner's namespace, and the files are named after it.
    push_to_hub_gguf(model, "tiny-gguf", tokenizer, ["q8_0", "f16"], temporary_location=staging)

    local = save_pretrained_gguf(model, tmp_path / "local", tokenizer, ["q8_0", "f16"], model_name="tiny-gguf")
    assert [Path(p).name for p in local] == ["tiny-gguf.Q8_0.gguf", "tiny-gguf.F16.gguf"]
    card = fake_hub.files.pop("README.md").decode()
    assert _digests(fake_hub.files) == _local(tmp_path / "local")
    assert {"tiny-gguf.Q8_0.gguf", "tiny-gguf.F16.gguf", "Modelfile", "tiny-gguf.Q8_0.Modelfile"} <= set(fake_hub.files)

    create, upload = fake_hub.kwargs("create_repo"), fake_hub.kwargs("upload_folder")
    assert create["repo_id"] == "tiny-gguf" and create["private"] is None and create["exist_ok"] is True
    assert upload["repo_id"] == f"{USER}/tiny-gguf"  # the full id the Hub returned
    assert create["token"] == upload["token"] == "hf_stored"
    assert upload["commit_message"] == hub.DEFAULT_COMMIT_MESSAGE
    _assert_cleaned_up(fake_hub, staging)

    front_matter, _, body = card.removeprefix("---\n").partition("\n---\n")
    assert "base_model: meta-llama/Llama-3.2-1B" in front_matter.splitlines()
    assert "- gguf" in front_matter.splitlines() and "- loraforge" in front_matter.splitlines()
    for text in ("tiny-gguf.Q8_0.gguf", "tiny-gguf.F16.gguf", "| Q8_0 |", "| F16 |", "loraforge",
                 f"llama-cli -hf {USER}/tiny-gguf:Q8_0", f"ollama run hf.co/{USER}/tiny-gguf:Q8_0"):  # fmt: skip
        assert text in body, text


def test_model_card_names_only_hub_base_models(lora, tmp_path, monkeypatch):
    model, _ = lora
    config = model.peft_config["default"]
    for local in (str(tmp_path), "/models/llama/base", "./base"):
        monkeypatch.setattr(config, "base_model_name_or_path", local)
        assert hub._base_model_id(model) is None, local  # a folder is not published in the card
    monkeypatch.setattr(config, "base_model_name_or_path", "Qwen/Qwen3-0.6B")
    assert hub._base_model_id(model) == "Qwen/Qwen3-0.6B"
    card = hub.gguf_model_card("me/m", ["m.Q4_K_M.gguf"], ["Q4_K_M"], None)
    assert "base_model" not in card and "| `m.Q4_K_M.gguf` | Q4_K_M |" in card


def test_default_temporary_folder_is_removed(lora, fake_hub):
    model, tokenizer = lora
    push_to_hub_merged(model, "me/adapter", tokenizer, "lora", token="t")
    root = fake_hub.folder.parent
    assert root.parent == Path(tempfile.gettempdir()) and root.name.startswith("loraforge-push-")
    assert not root.exists()


def test_attached_methods_push(lora, fake_hub, tmp_path):
    model, tokenizer = lora
    attach_export_methods(model)
    model.push_to_hub_merged("me/adapter", tokenizer, save_method="lora", token="t", temporary_location=tmp_path)
    assert "adapter_model.safetensors" in fake_hub.files
    model.push_to_hub_gguf("me/gguf", tokenizer, quantization_method="q8_0", token="t", temporary_location=tmp_path)
    assert "gguf.Q8_0.gguf" in fake_hub.files and "README.md" in fake_hub.files
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("repo_id", ["a/b/c", "has space", "", "-leading", "two--dashes", "x.git", None, Path("a")])
def test_bad_repo_id_is_refused_before_anything(lora, fake_hub, repo_id):
    model, tokenizer = lora
    with pytest.raises(ValueError, match="'owner/name' or 'name'"):
        push_to_hub_merged(model, repo_id, tokenizer, token="t")
    with pytest.raises(ValueError, match="'owner/name' or 'name'"):
        push_to_hub_gguf(model, repo_id, tokenizer, token="t")
    assert fake_hub.calls == []


@pytest.mark.parametrize("token", [None, "", False])
def test_no_token_says_how_to_log_in(lora, fake_hub, token):
    model, tokenizer = lora
    for push in (push_to_hub_merged, push_to_hub_gguf):
        with pytest.raises(LocalTokenNotFoundError, match="hf auth login.*HF_TOKEN"):
            push(model, "me/m", tokenizer, token=token)
    assert fake_hub.calls == []


def test_bad_export_arguments_fail_before_the_repository_is_created(lora, fake_hub):
    model, tokenizer = lora
    with pytest.raises(ValueError, match="save_method must be one of"):
        push_to_hub_merged(model, "me/m", tokenizer, "merged_8bit", token="t")
    with pytest.raises(ValueError, match="unknown quantization_method"):
        push_to_hub_gguf(model, "me/m", tokenizer, ["q8_0", "q9_k"], token="t")
    with pytest.raises(ValueError, match="needs the tokenizer"):
        push_to_hub_gguf(model, "me/m", None, token="t")
    assert fake_hub.calls == []


def test_offline_mode_is_refused_up_front(lora, fake_hub, monkeypatch):
    model, tokenizer = lora
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="'me/m'.*HF_HUB_OFFLINE"):
        push_to_hub_merged(model, "me/m", tokenizer, token="t")
    assert fake_hub.calls == []


def test_no_network_fails_before_the_export(lora, fake_hub, tmp_path):
    model, tokenizer = lora
    fake_hub.failures["create_repo"] = ConnectionError("Name or service not known")
    with pytest.raises(RuntimeError, match="(?s)'me/m'.*network.*ConnectionError: Name or service not known") as caught:
        push_to_hub_gguf(model, "me/m", tokenizer, token="t", temporary_location=tmp_path)
    assert isinstance(caught.value.__cause__, ConnectionError)
    assert fake_hub.names() == ["HfApi", "create_repo"] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("push", [push_to_hub_merged, push_to_hub_gguf])
def test_failed_upload_names_the_repo_and_removes_the_folder(lora, fake_hub, tmp_path, push):
    import httpx2  # huggingface_hub's HTTP client: build the error it raises for a refused write

    model, tokenizer = lora
    request = httpx2.Request("POST", "https://huggingface.co/api/models/me/m/commit/main")
    try:
        huggingface_hub.utils.hf_raise_for_status(httpx2.Response(403, request=request))
    except huggingface_hub.errors.HfHubHTTPError as error:
        fake_hub.failures["upload_folder"] = error
    with pytest.raises(RuntimeError, match="(?s)uploading to 'me/m'.*write access.*hf auth login.*403 Forbidden"):
        push(model, "me/m", tokenizer, token="t", temporary_location=tmp_path)
    assert fake_hub.files  # the export was complete when the upload began
    _assert_cleaned_up(fake_hub, tmp_path)


def test_interrupted_upload_removes_the_folder(lora, fake_hub, tmp_path):
    model, tokenizer = lora
    fake_hub.failures["upload_folder"] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):  # not wrapped: Ctrl-C stays Ctrl-C
        push_to_hub_merged(model, "me/m", tokenizer, "lora", token="t", temporary_location=tmp_path)
    _assert_cleaned_up(fake_hub, tmp_path)


def test_failed_export_uploads_nothing_and_removes_the_folder(lora, fake_hub, tmp_path, monkeypatch):
    model, tokenizer = lora
    written = []

    def export_then_fail(model, folder, *args, **kwargs):
        written.extend(save_pretrained_gguf(model, folder, *args, **kwargs))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hub, "save_pretrained_gguf", export_then_fail)
    with pytest.raises(OSError, match="No space left"):  # the export's own error, unchanged
        push_to_hub_gguf(model, "me/m", tokenizer, token="t", temporary_location=tmp_path)
    assert written and not Path(written[0]).exists()
    assert fake_hub.names() == ["HfApi", "create_repo"] and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return testing.save_tiny_model(tmp_path_factory.mktemp("cli") / "base", arch="llama", seed=1)


def _cli(capsys, *args):
    from loraforge import cli

    code = cli.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("format_args", [["--format", "merged_16bit"], ["--for", "ollama", "--quantization", "q8_0"]])
def test_cli_export_push_to_hub(base_folder, fake_hub, tmp_path, capsys, monkeypatch, format_args):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_stored")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "staging"))  # where mkdtemp puts the export
    (tmp_path / "staging").mkdir()
    code, out, err = _cli(capsys, "export", "--model", base_folder, *format_args, "--push-to-hub", "me/cli", "--private")
    assert code == 0, err
    assert "pushed to https://huggingface.co/me/cli" in out and OID in out
    create, upload = fake_hub.kwargs("create_repo"), fake_hub.kwargs("upload_folder")
    assert create["private"] is True and create["token"] == upload["token"] == "hf_stored"
    assert list((tmp_path / "staging").iterdir()) == []

    code, _, err = _cli(capsys, "export", "--model", base_folder, *format_args, "--output", tmp_path / "cli")
    assert code == 0, err
    fake_hub.files.pop("README.md", None)  # the GGUF model card exists only on the Hub
    assert _digests(fake_hub.files) == _local(tmp_path / "cli")


def test_cli_push_to_hub_errors(fake_hub, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    # No login: said before the model loads (the model folder does not even exist).
    code, _, err = _cli(capsys, "export", "--model", missing, "--format", "merged_16bit", "--push-to-hub", "me/m")
    assert code == 1 and "hf auth login" in err and "HF_TOKEN" in err
    code, _, err = _cli(capsys, "export", "--model", missing, "--format", "merged_16bit", "--push-to-hub", "a/b/c")
    assert code == 2 and "'owner/name' or 'name'" in err
    code, _, err = _cli(capsys, "export", "--model", missing, "--format", "gguf", "--push-to-hub", "me/m",
                        "--output", tmp_path / "x")  # fmt: skip
    assert code == 2 and "not allowed with argument" in err
    code, _, err = _cli(capsys, "export", "--model", missing, "--format", "gguf", "--output", tmp_path / "x", "--private")
    assert code == 2 and "--private applies to --push-to-hub only" in err
    assert fake_hub.calls == [] and not (tmp_path / "x").exists()
