"""Supervised fine-tuning from a handful of settings: what `loraforge sft` and `loraforge quickstart` run.

    settings = SFTSettings(model="meta-llama/Llama-3.1-8B-Instruct", dataset="chats.jsonl",
                           chat_template="llama-3.1", responses_only=True, max_steps=60)
    result = run_sft(settings)            # adapter in outputs/adapter, exports beside it

The steps are the usual notebook's, each a function so the quickstart can show what happens between
them: `load_model` (FastLanguageModel.from_pretrained + get_peft_model + get_chat_template),
`load_table` and `tokenize_table` (JSONL / CSV / Parquet / `save_to_disk` folder; "messages" or
"conversations" rendered with the chat template, or a plain "text" column), `build_trainer` (TRL's
SFTTrainer, plus train_on_responses_only), then `export_model`.

Conversations are tokenized here, not by TRL, exactly as `tokenizer.apply_chat_template(messages,
tokenize=True)` tokenizes them (the template's text, no extra special tokens). That is what the model
sees at inference, and templates that write BOS themselves (Llama 3) do not get a second one.

Mistakes in what the user asked for (a missing file, an unknown column or template) raise
`SFTInputError`, whose message says what to change; the CLI prints it without a traceback.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import torch

from loraforge import distributed as lfd

__all__ = [
    "DEFAULT_TARGETS", "EXPORT_KINDS", "SFTInputError", "SFTResult", "SFTSettings", "build_trainer",
    "encode_chat", "export_model", "load_model", "load_table", "parse_export_targets", "run_sft",
    "tokenize_table",
]  # fmt: skip

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONVERSATION_COLUMNS = ("messages", "conversations")
TEXT_COLUMN = "text"
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# What `--export` accepts; a bare "gguf" means the quantization most people serve: q4_k_m.
EXPORT_KINDS = ("lora", "merged_16bit", "merged_4bit", "gguf")
DEFAULT_GGUF_QUANTIZATION = "q4_k_m"


class SFTInputError(ValueError):
    """Something the user gave (a path, a column, a name) is wrong; the message says how to fix it."""


@dataclasses.dataclass
class SFTSettings:
    """Everything one fine-tuning run needs. Defaults are the practitioners' (Unsloth notebooks')."""

    model: str
    dataset: str
    output_dir: str = "outputs"
    chat_template: str | None = None  # None: the tokenizer's own template
    column: str | None = None  # None: "messages", "conversations" or "text", whichever exists
    max_seq_length: int | None = None  # None: the model's context, at most 2048
    load_in_4bit: bool = True
    stream_base_weights: bool = False  # NF4 base weights in host memory, a layer at a time on the GPU
    offload_embedding: bool | str = "auto"  # the input embedding table in pinned host memory ("auto": where it can)
    dtype: str = "auto"  # auto: bf16 where the GPU has it, else fp16; fp32 on CPU
    r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    use_gradient_checkpointing: str = "unsloth"  # "unsloth" (offloaded), "true" or "false"
    use_rslora: bool = False
    learning_rate: float = 2e-4
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    max_steps: int | None = None  # None: train num_train_epochs
    num_train_epochs: float = 1.0
    warmup_steps: int = 5
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.01
    optim: str = "auto"  # auto: adamw_8bit on a GPU, adamw_torch on CPU
    seed: int = 3407
    logging_steps: int = 1
    save_steps: int = 0  # 0: no intermediate checkpoints
    responses_only: bool = False
    export: tuple[str, ...] = ()
    overwrite: bool = False

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


@dataclasses.dataclass
class SFTResult:
    model: object
    tokenizer: object
    trainer: object
    losses: list[tuple[int, float]]  # (step, loss) as logged
    seconds: float  # training only
    tokens: int  # non-padding tokens seen in training
    adapter_dir: str
    exports: dict[str, list[str]]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}  # fmt: skip


def _checkpointing_mode(value):
    text = str(value).lower()
    if text == "unsloth":
        return "unsloth"
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", "none"):
        return False
    raise SFTInputError(f'use_gradient_checkpointing must be "unsloth", true or false, got {value!r}')


def check_model_source(model: str) -> None:
    """A path that looks local must exist; anything else is taken as a hub name."""
    looks_local = model.startswith((".", "/", "~")) or os.path.isabs(model) or model.count("/") > 1
    if looks_local and not Path(model).expanduser().exists():
        raise SFTInputError(f"model folder {model!r} does not exist (give a local folder or a hub name like "
                            "meta-llama/Llama-3.1-8B-Instruct)")  # fmt: skip


def validate(settings: SFTSettings) -> None:
    """The checks that need no model or data loaded, so a typo fails in a second, not after a download."""
    from loraforge.data import lookup_template

    if settings.chat_template:
        try:
            lookup_template(settings.chat_template)
        except ValueError as error:
            raise SFTInputError(str(error)) from None
    check_model_source(settings.model)
    if getattr(settings, "stream_base_weights", False) and not settings.load_in_4bit:
        raise SFTInputError("--stream-base-weights streams NF4 base weights: it needs --load-in-4bit")
    offload = getattr(settings, "offload_embedding", "auto")
    if not isinstance(offload, bool) and offload != "auto":
        raise SFTInputError(f'offload_embedding must be true, false or "auto", got {offload!r}')
    if not Path(settings.dataset).expanduser().exists():
        raise SFTInputError(f"dataset {settings.dataset!r} does not exist (give a .jsonl, .json, .csv or .parquet "
                            "file, or a folder written by datasets' save_to_disk)")  # fmt: skip
    if settings.dtype not in _DTYPES:
        raise SFTInputError(f"dtype must be one of {', '.join(_DTYPES)}, got {settings.dtype!r}")
    _checkpointing_mode(settings.use_gradient_checkpointing)
    parse_export_targets(settings.export)


def load_model(settings: SFTSettings):
    """(PEFT model with LoRA, tokenizer with the chat template), as the notebook builds them. Any
    settings object with SFTSettings' model and LoRA fields will do (GRPO's does)."""
    from loraforge.data import get_chat_template
    from loraforge.models import FastLanguageModel

    validate(settings)
    try:
        model, tokenizer = FastLanguageModel.from_pretrained(
            str(Path(settings.model).expanduser()) if Path(settings.model).expanduser().exists() else settings.model,
            max_seq_length=settings.max_seq_length, dtype=_DTYPES[settings.dtype], load_in_4bit=settings.load_in_4bit,
            stream_base_weights=getattr(settings, "stream_base_weights", False),
            offload_embedding=False,  # (after the chat template's resize, below)
        )  # fmt: skip
    except OSError as error:  # not a folder, not on the hub, no network, no access
        raise SFTInputError(f"could not load model {settings.model!r}: {error}") from None
    except ValueError as error:  # from_pretrained's argument checks: context length, rope scaling, dtype
        raise SFTInputError(f"model {settings.model!r}: {error} (see --max-seq-length)") from None
    if settings.chat_template:
        # Before the adapters: a template token the vocabulary lacks needs an embedding row first.
        tokenizer = get_chat_template(tokenizer, settings.chat_template)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    from loraforge.models.host_embedding import apply_offload_setting

    try:  # after the resize, which would build a new GPU table
        apply_offload_setting(model, getattr(settings, "offload_embedding", "auto"))
    except ValueError as error:  # True, and a table on the CPU or tied to the output head
        raise SFTInputError(f"--offload-embedding: {error}") from None
    try:
        model = FastLanguageModel.get_peft_model(
            model, r=settings.r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
            target_modules=list(settings.target_modules), use_rslora=settings.use_rslora,
            use_gradient_checkpointing=_checkpointing_mode(settings.use_gradient_checkpointing),
            random_state=settings.seed,
        )  # fmt: skip
    except ValueError as error:  # an unknown target module, a bad rank or dropout
        raise SFTInputError(str(error)) from None
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def load_table(path: str | os.PathLike):
    """A `datasets.Dataset` from a JSONL / JSON / CSV / Parquet file or a `save_to_disk` folder."""
    import datasets

    path = Path(path).expanduser()
    if not path.exists():
        raise SFTInputError(f"dataset {str(path)!r} does not exist (give a .jsonl, .json, .csv or .parquet file, "
                            "or a folder written by datasets' save_to_disk)")  # fmt: skip
    if path.is_dir():
        try:
            table = datasets.load_from_disk(str(path))
        except FileNotFoundError as error:
            raise SFTInputError(f"{str(path)!r} is a folder but not one written by save_to_disk: {error}") from None
        if isinstance(table, datasets.DatasetDict):
            if "train" not in table:
                raise SFTInputError(f"{str(path)!r} holds splits {list(table)}, none named 'train'")
            table = table["train"]
        return table
    builder = TABLE_SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise SFTInputError(f"dataset {str(path)!r}: unknown file type {path.suffix!r}; "
                            f"use one of {', '.join(TABLE_SUFFIXES)} or a save_to_disk folder")  # fmt: skip
    try:
        table = getattr(datasets.Dataset, f"from_{builder}")(str(path))
    except Exception as error:  # noqa: BLE001 - pyarrow and datasets raise many kinds for malformed files
        raise SFTInputError(f"could not read {str(path)!r} as {builder}: {type(error).__name__}: {error}") from None
    if len(table) == 0:
        raise SFTInputError(f"dataset {str(path)!r} has no rows")
    return table


def find_column(table, column: str | None) -> tuple[str, str]:
    """(column name, "conversations" or "text") of the column to train on."""
    names = list(table.column_names)
    if column is not None:
        if column not in names:
            raise SFTInputError(f"dataset has no column {column!r}; its columns are {names}")
        first = table[0][column]
        return column, TEXT_COLUMN if isinstance(first, str) else "conversations"
    for name in CONVERSATION_COLUMNS:
        if name in names:
            return name, "conversations"
    if TEXT_COLUMN in names:
        return TEXT_COLUMN, TEXT_COLUMN
    raise SFTInputError(f"dataset has none of the columns 'messages', 'conversations' (lists of chat messages) or "
                        f"'text'; its columns are {names}. Rename one, or pass --column NAME")  # fmt: skip


def encode_chat(tokenizer, messages, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation: the chat template's text, no extra special tokens, which is what
    apply_chat_template(tokenize=True) gives and what a server that applies the template feeds."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_table(table, tokenizer, column: str | None = None):
    """A Dataset with one "input_ids" column, ready for SFTTrainer (which then truncates and shuffles)."""
    from loraforge.data import standardize_sharegpt

    name, kind = find_column(table, column)
    if kind == "conversations":
        if not getattr(tokenizer, "chat_template", None):
            raise SFTInputError("the dataset holds conversations but the tokenizer has no chat template; "
                                "pass --chat-template NAME (e.g. chatml, llama-3.1)")  # fmt: skip
        try:
            table = standardize_sharegpt(table, column=name)  # role/content rows pass through unchanged
        except ValueError as error:
            raise SFTInputError(f"column {name!r}: {error}") from None

        def encode(row):
            return {"input_ids": encode_chat(tokenizer, row[name])}
    else:
        eos = tokenizer.eos_token or ""

        def encode(row):
            text = row[name] if row[name].endswith(eos) else row[name] + eos  # so the model learns to stop
            return {"input_ids": tokenizer(text)["input_ids"]}

    try:
        return table.map(encode, remove_columns=table.column_names, desc="tokenizing")
    except Exception as error:  # noqa: BLE001 - a template that rejects the data (roles out of order) raises anything
        raise SFTInputError(f"could not render column {name!r} with the chat template: {error}") from None


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------


class TokenCounter:
    """Tokens trained on (the attention mask's ones, else every input id), summed on the mask's device and
    read back only when `value` is asked for. An int() of each step's sum made the host wait there for the
    previous step's backward and optimizer, so every forward began with the host no longer ahead of the GPU
    (the 8B forward issues more host work than the GPU needs time for, benchmarks/results/train_step_limits.md)."""

    def __init__(self):
        self._read, self._pending = 0, None

    def add(self, inputs) -> None:
        mask = inputs.get("attention_mask")
        if mask is None:
            self._read += inputs["input_ids"].numel()  # (a shape: no read of the device)
            return
        count = mask.sum()
        self._pending = count if self._pending is None else self._pending + count

    @property
    def value(self) -> int:
        if self._pending is not None:
            self._read += int(self._pending)
            self._pending = None
        return self._read


def _trainer_class():
    import trl
    from transformers import Trainer

    from loraforge.data.template_check import warn_on_chat_template_problems
    from loraforge.models.patch import is_patched

    class LoraforgeSFTTrainer(trl.SFTTrainer):
        """TRL's SFTTrainer whose loss is the model's own forward: loraforge's fused linear
        cross-entropy on a patched model. TRL's own scoring is a Triton kernel, which on a machine
        without a GPU runs in Triton's interpreter, orders of magnitude slower than the model. Also
        counts the tokens trained on, for tokens/s, and warns as training starts when the chat
        template does not fit the model (data/template_check.py)."""

        _tokens = None  # a TokenCounter, made at the first step

        @property
        def tokens_seen(self) -> int:
            return self._tokens.value if self._tokens is not None else 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self._tokens is None:
                self._tokens = TokenCounter()
            self._tokens.add(inputs)
            if is_patched(model) or not torch.cuda.is_available():
                return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)  # fmt: skip
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def train(self, *args, **kwargs):
            warn_on_chat_template_problems(self.model, self.processing_class)  # wrong family, or won't stop
            return super().train(*args, **kwargs)

    return LoraforgeSFTTrainer


def _optimizer(name: str) -> str:
    if name != "auto":
        return name
    # bitsandbytes' 8-bit AdamW keeps optimizer state at a quarter of the size; it needs a GPU.
    return "adamw_8bit" if torch.cuda.is_available() else "adamw_torch"


def build_trainer(model, tokenizer, train_dataset, settings: SFTSettings, callbacks=()):
    """TRL's SFTTrainer (see _trainer_class) with settings' hyperparameters; train_on_responses_only
    applied when settings.responses_only."""
    import trl

    from loraforge.data import train_on_responses_only

    on_gpu = torch.cuda.is_available()
    bf16 = on_gpu and torch.cuda.is_bf16_supported() and settings.dtype in ("auto", "bfloat16", "bf16")
    args = trl.SFTConfig(
        output_dir=str(Path(settings.output_dir) / "checkpoints"),
        # Every LoRA parameter gets a gradient each step: no per-step search for unused ones under DDP.
        ddp_find_unused_parameters=False,
        max_steps=settings.max_steps if settings.max_steps else -1,
        num_train_epochs=settings.num_train_epochs,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_steps,
        lr_scheduler_type=settings.lr_scheduler_type,
        weight_decay=settings.weight_decay,
        optim=_optimizer(settings.optim),
        seed=settings.seed,
        logging_steps=settings.logging_steps,
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or 500,
        max_length=settings.max_seq_length or getattr(model, "max_seq_length", None) or 2048,
        bf16=bf16,
        fp16=on_gpu and not bf16 and settings.dtype != "float32",
        use_cpu=not on_gpu,
        # The model already checkpoints the way get_peft_model set it up ("unsloth": offloaded);
        # the Trainer's own switch would replace that with plain checkpointing.
        activation_checkpointing=False,
        report_to=[],
        disable_tqdm=True,
        dataset_num_proc=None,
    )  # fmt: skip
    trainer = _trainer_class()(model=model, processing_class=tokenizer, train_dataset=train_dataset, args=args,
                               callbacks=list(callbacks))  # fmt: skip
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our callbacks print a line per log instead of raw dicts
    if settings.responses_only:
        try:
            trainer = train_on_responses_only(trainer)
        except ValueError as error:
            raise SFTInputError(f"--responses-only: {error}") from None
    return trainer


def progress_callback(write=print, total_steps: int | None = None, extra: tuple[str, ...] = ()):
    """A TrainerCallback that prints one line per logged step: loss, the `extra` logged values (e.g.
    GRPO's "reward"), learning rate, time, ETA."""
    from transformers import TrainerCallback

    class ProgressLines(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            elapsed = time.perf_counter() - self.start
            total = total_steps or state.max_steps
            eta = elapsed / max(state.global_step, 1) * max(total - state.global_step, 0)
            values = "".join(f"{key} {float(logs[key]):.4f}  " for key in extra if key in logs)
            line = (f"  step {state.global_step:>{len(str(total))}}/{total}  loss {float(logs['loss']):.4f}  {values}"
                    f"lr {float(logs.get('learning_rate', 0)):.2e}  {elapsed:6.1f} s  eta {eta:5.0f} s")  # fmt: skip
            write(line)

    return ProgressLines()


def logged_losses(trainer) -> list[tuple[int, float]]:
    return [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def parse_export_targets(spec) -> list[tuple[str, str | None]]:
    """"merged_16bit,gguf:q4_k_m,gguf:q8_0" (or a list of such) -> [(kind, quantization or None)]."""
    from loraforge.export import GGUF_QUANTIZATION_METHODS

    items = spec.split(",") if isinstance(spec, str) else [part for item in spec for part in str(item).split(",")]
    targets = []
    for item in (part.strip().lower() for part in items):
        if not item:
            continue
        kind, _, quantization = item.partition(":")
        if kind not in EXPORT_KINDS:
            raise SFTInputError(f"unknown export {item!r}; use {', '.join(EXPORT_KINDS)}, with gguf:QUANT for "
                                f"GGUF quantizations (default {DEFAULT_GGUF_QUANTIZATION})")  # fmt: skip
        if kind == "gguf":
            quantization = quantization or DEFAULT_GGUF_QUANTIZATION
            if quantization not in GGUF_QUANTIZATION_METHODS:
                raise SFTInputError(f"unknown GGUF quantization {quantization!r}; "
                                    f"valid: {', '.join(GGUF_QUANTIZATION_METHODS)}")  # fmt: skip
        elif quantization:
            raise SFTInputError(f"export {item!r}: only gguf takes a quantization (gguf:q4_k_m)")
        if (kind, quantization or None) not in targets:
            targets.append((kind, quantization or None))
    return targets


def export_model(model, tokenizer, output_dir, targets, *, overwrite=False, gguf_name=None,
                 write_modelfile=True) -> dict[str, list[str]]:  # fmt: skip
    """Write each target into output_dir/<kind> (all GGUF quantizations into output_dir/gguf).
    Returns {kind: [paths]}; GGUF entries list the .gguf files, then the Modelfiles."""
    from loraforge.export import save_pretrained_gguf, save_pretrained_merged
    from loraforge.export.modelfile import modelfile_paths

    output_dir = Path(output_dir)
    written: dict[str, list[str]] = {}
    for kind in ("lora", "merged_16bit", "merged_4bit"):
        if (kind, None) in targets:
            written[kind] = [save_pretrained_merged(model, output_dir / kind, tokenizer, save_method=kind,
                                                    overwrite=overwrite)]  # fmt: skip
    quantizations = [q for kind, q in targets if kind == "gguf"]
    if quantizations:
        files = save_pretrained_gguf(model, output_dir / "gguf", tokenizer, quantization_method=quantizations,
                                     overwrite=overwrite, model_name=gguf_name or output_dir.resolve().name,
                                     write_modelfile=write_modelfile)  # fmt: skip
        modelfiles = [str(path) for path, _ in modelfile_paths(files)] if write_modelfile else []
        written["gguf"] = list(files) + modelfiles
    return written


# --------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------


def refuse_existing_outputs(settings: SFTSettings) -> None:
    """Before hours of training: refuse to write over an earlier run's adapter unless overwrite."""
    adapter = Path(settings.output_dir) / "adapter"
    if adapter.exists() and any(adapter.iterdir()) and not settings.overwrite:
        raise SFTInputError(f"{adapter} already holds an adapter; pass --overwrite or choose another --output")


def save_adapter(model, tokenizer, output_dir, overwrite: bool) -> str:
    from loraforge.export import save_pretrained_merged

    return save_pretrained_merged(model, Path(output_dir) / "adapter", tokenizer, save_method="lora",
                                  overwrite=overwrite)  # fmt: skip


def run_sft(settings: SFTSettings, callbacks=()) -> SFTResult:
    """Load, tokenize, train, save the adapter (output_dir/adapter) and export what settings.export asks."""
    validate(settings)
    targets = parse_export_targets(settings.export)
    refuse_existing_outputs(settings)
    table = load_table(settings.dataset)
    find_column(table, settings.column)  # before the model loads
    model, tokenizer = load_model(settings)
    dataset = tokenize_table(table, tokenizer, settings.column)
    trainer = build_trainer(model, tokenizer, dataset, settings, callbacks)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    # Under torchrun / accelerate launch, rank 0 writes and the others wait (each rank writing the same
    # folders races: FileExistsError, or one rank replacing the other's files).
    adapter_dir = lfd.save_on_main(save_adapter)(model, tokenizer, settings.output_dir, settings.overwrite)
    exports = lfd.save_on_main(export_model)(model, tokenizer, settings.output_dir, targets,
                                             overwrite=settings.overwrite)  # fmt: skip
    lfd.finish_distributed()
    return SFTResult(model, tokenizer, trainer, logged_losses(trainer), seconds, trainer.tokens_seen, adapter_dir,
                     exports)  # fmt: skip


def final_loss(losses: list[tuple[int, float]], last_steps: int = 10) -> float:
    """The mean of the losses logged over the last few steps (one step's loss is noisy)."""
    if not losses:
        return math.nan
    tail = [loss for step, loss in losses if step > losses[-1][0] - last_steps]
    return sum(tail) / len(tail)
