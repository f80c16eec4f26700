"""push_to_hub_merged / push_to_hub_gguf: an export uploaded to a Hugging Face Hub model repository.

    push_to_hub_merged(model, "me/my-model", tokenizer, save_method="merged_16bit")
    push_to_hub_gguf(model, "me/my-model-GGUF", tokenizer, quantization_method=["q8_0", "q4_k_m"])

The export is written by save_pretrained_merged / save_pretrained_gguf (same arguments) into a
temporary folder, so the files uploaded are exactly the files a local save writes; a GGUF push adds
a README model card. The folder goes up in one commit through huggingface_hub's own client
(HfApi.create_repo, HfApi.upload_folder) and is removed afterwards, whether the push succeeded or not.

The repository is created (or found: exist_ok) before the export runs, so a refused token or a missing
network fails in seconds rather than after a long export; an export that then fails may leave the
repository empty, and the next push fills it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from loraforge.export.gguf_convert import save_pretrained_gguf
from loraforge.export.gguf_mixes import resolve_mixes
from loraforge.export.merge import DEFAULT_MAX_SHARD_BYTES, SAVE_METHODS, save_pretrained_merged

__all__ = [
    "DEFAULT_COMMIT_MESSAGE",
    "check_repo_id",
    "gguf_model_card",
    "push_to_hub_gguf",
    "push_to_hub_merged",
    "resolve_token",
]

DEFAULT_COMMIT_MESSAGE = "Trained with loraforge"
_LOGIN_HINT = "log in with `hf auth login` (older huggingface_hub: `huggingface-cli login`) or set HF_TOKEN"


def check_repo_id(repo_id) -> None:
    """The Hub takes "owner/name" or a bare "name" (the token owner's namespace)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"repo_id must be 'owner/name' or 'name', got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"repo_id must be 'owner/name' or 'name' as the Hub accepts them: {error}") from None


def resolve_token(token=None) -> str:
    """The token to push with: `token`, else the one huggingface_hub finds (HF_TOKEN, or a stored login).

    None, "" and True all mean "find it" (Unsloth's notebooks pass token=""); False, or nothing found,
    raises huggingface_hub's LocalTokenNotFoundError saying how to log in.
    """
    import huggingface_hub
    from huggingface_hub.errors import LocalTokenNotFoundError

    if token is None or token is True or token == "":
        token = huggingface_hub.get_token()
    if not isinstance(token, str) or not token:
        raise LocalTokenNotFoundError(
            f"pushing to the Hugging Face Hub needs a token with write access and none was found: pass token=..., "
            f"{_LOGIN_HINT}."
        )
    return token


def _on_hub(action: str, repo_id: str, call):
    """Run one Hub request; any failure becomes a RuntimeError that names the repository."""
    try:
        return call()
    except Exception as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            hint = f" The token was refused or may not write there: use a token with write access; {_LOGIN_HINT}."
        elif status is None:
            hint = " Check the network connection to the Hub."
        else:
            hint = ""
        message = f"{action} {repo_id!r} on the Hugging Face Hub failed.{hint}\n{type(error).__name__}: {error}"
        raise RuntimeError(message) from error


def _open_repository(repo_id: str, token: str, private: bool | None):
    """(HfApi client, the full "owner/name" id) for a model repository that exists after this call."""
    import huggingface_hub
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise RuntimeError(f"cannot push to {repo_id!r}: HF_HUB_OFFLINE is set, so huggingface_hub makes no requests")
    api = huggingface_hub.HfApi()
    url = _on_hub(
        "creating the repository",
        repo_id,
        lambda: api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True),
    )
    # A bare name resolves to the token owner's namespace; the returned RepoUrl says which.
    return api, getattr(url, "repo_id", None) or repo_id


@contextlib.contextmanager
def _temporary_export_folder(parent: str | os.PathLike | None, name: str):
    """Yield `<new temporary folder>/<name>` (not created: the save functions create it); the
    temporary folder is removed on the way out, whatever happened."""
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="loraforge-push-", dir=parent))
    try:
        yield root / name
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if root.exists():
            warnings.warn(f"could not remove the temporary export folder {root}; delete it by hand", stacklevel=3)


def _upload(api, repo_id: str, folder: Path, token: str, commit_message, commit_description, revision, create_pr):
    return _on_hub(
        "uploading to",
        repo_id,
        lambda: api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
            commit_description=commit_description,
            token=token,
            repo_type="model",
            revision=revision,
            create_pr=create_pr,
        ),
    )


def push_to_hub_merged(
    model,
    repo_id: str,
    tokenizer=None,
    save_method: str = "merged_16bit",
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    maximum_memory_usage: float | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
    temporary_location: str | os.PathLike | None = None,
):
    """Save `model` as save_pretrained_merged does and upload the folder to the Hub model repo `repo_id`.

    repo_id: "owner/name", or "name" for the token owner's namespace; created when missing.
    save_method, maximum_memory_usage, max_shard_size: as for save_pretrained_merged ("lora" pushes
        the adapter alone).
    token: a Hub token with write access; None (or "") uses HF_TOKEN or the stored `hf auth login`.
    private: visibility of a repository this call creates (None: the Hub's default); an existing
        repository keeps its own.
    commit_message, commit_description, revision, create_pr: as for HfApi.upload_folder.
    temporary_location: the folder the export is written under before the upload (default: the
        system's temporary folder); it needs room for the whole checkpoint.

    Returns huggingface_hub's CommitInfo (a str, the commit URL; .repo_url, .oid, .pr_url).
    """
    check_repo_id(repo_id)
    if save_method not in SAVE_METHODS:  # checked before the repository is created
        raise ValueError(f"save_method must be one of {SAVE_METHODS}, got {save_method!r}")
    token = resolve_token(token)
    api, repo_id = _open_repository(repo_id, token, private)
    with _temporary_export_folder(temporary_location, repo_id.split("/")[-1]) as folder:
        save_pretrained_merged(
            model, folder, tokenizer, save_method, maximum_memory_usage, max_shard_size=max_shard_size
        )
        return _upload(api, repo_id, folder, token, commit_message, commit_description, revision, create_pr)


def _base_model_id(model) -> str | None:
    """The base model's Hub id, when it is one (not a local folder): a PEFT adapter's
    base_model_name_or_path, else the model config's name_or_path."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    name = None
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and peft_config:
        adapter = getattr(model, "active_adapter", None)
        config = peft_config.get(adapter) if isinstance(adapter, str) else None
        name = getattr(config or next(iter(peft_config.values())), "base_model_name_or_path", None)
    if not name:
        name = getattr(getattr(model, "config", None), "name_or_path", None)
    if not isinstance(name, str) or not name or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def gguf_model_card(repo_id: str, gguf_files: list[str], quantizations: list[str], base_model: str | None) -> str:
    """A short README.md for a GGUF repository: the base model, the quantizations, how to run them."""
    import huggingface_hub

    import loraforge

    metadata = huggingface_hub.ModelCardData(base_model=base_model, tags=["gguf", "llama.cpp", "ollama", "loraforge"])
    origin = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a base model"
    rows = "\n".join(f"| `{name}` | {quant} |" for name, quant in zip(gguf_files, quantizations))
    return (
        f"---\n{metadata.to_yaml()}\n---\n\n"
        f"# {repo_id.split('/')[-1]}\n\n"
        f"GGUF files of a fine-tune of {origin}, merged and quantized by loraforge {loraforge.__version__}, "
        "for llama.cpp and Ollama.\n\n"
        f"| file | quantization |\n|---|---|\n{rows}\n\n"
        f"llama.cpp: `llama-cli -hf {repo_id}:{quantizations[0]}`\n\n"
        f"Ollama: `ollama run hf.co/{repo_id}:{quantizations[0]}`, or download a GGUF file with its "
        f"`.Modelfile` (chat template, stop tokens, context length) and run "
        f"`ollama create {repo_id.split('/')[-1].lower()} -f {Path(gguf_files[0]).stem}.Modelfile`.\n"
    )


def push_to_hub_gguf(
    model,
    repo_id: str,
    tokenizer,
    quantization_method="q8_0",
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    model_name: str | None = None,
    pre_tokenizer: str | None = None,
    write_modelfile: bool = True,
    write_model_card: bool = True,
    pack_device="auto",
    temporary_location: str | os.PathLike | None = None,
):
    """Write `model` as save_pretrained_gguf does and upload the GGUF files, their Ollama Modelfiles
    and a README model card to the Hub model repo `repo_id`.

    quantization_method, pre_tokenizer, write_modelfile, pack_device: as for save_pretrained_gguf.
    model_name: the GGUF file stem; defaults to the repository's name (`<name>.Q8_0.gguf`).
    write_model_card: upload a README.md naming the base model, the quantizations and loraforge
        (it replaces the repository's README).
    repo_id, token, private, commit_message, commit_description, revision, create_pr,
        temporary_location: as for push_to_hub_merged.

    Returns huggingface_hub's CommitInfo (a str, the commit URL; .repo_url, .oid, .pr_url).
    """
    check_repo_id(repo_id)
    if tokenizer is None:
        raise ValueError("push_to_hub_gguf needs the tokenizer: a GGUF file carries the vocabulary")
    mixes = resolve_mixes(quantization_method)  # names checked before the repository is created
    token = resolve_token(token)
    api, repo_id = _open_repository(repo_id, token, private)
    with _temporary_export_folder(temporary_location, repo_id.split("/")[-1]) as folder:
        paths = save_pretrained_gguf(
            model, folder, tokenizer, quantization_method, model_name=model_name or folder.name,
            pre_tokenizer=pre_tokenizer, write_modelfile=write_modelfile, pack_device=pack_device,
        )  # fmt: skip
        if write_model_card:
            names = [Path(p).name for p in paths]
            card = gguf_model_card(repo_id, names, [mix.name for mix in mixes], _base_model_id(model))
            (folder / "README.md").write_text(card, encoding="utf-8")
        return _upload(api, repo_id, folder, token, commit_message, commit_description, revision, create_pr)
