"""The `loraforge` command line: quickstart, sft, grpo, export, env (and the older NF4 demo).

    loraforge quickstart                                  # tiny model, offline, CPU: train, merge, GGUF
    loraforge sft --model meta-llama/Llama-3.1-8B-Instruct --dataset chats.jsonl --chat-template llama-3.1
    loraforge sft --config run.yaml --max-steps 100       # flags win over the YAML file
    loraforge grpo --model Qwen/Qwen2.5-1.5B-Instruct --dataset gsm8k.jsonl --rewards xml_tags:0.5,numeric_answer:2
    loraforge export --adapter outputs/adapter --output served --for ollama
    loraforge export --adapter outputs/adapter --for ollama --push-to-hub me/my-model-GGUF
    loraforge env                                         # GPU, versions, loraforge's CUDA build, warnings

Mistakes in what was asked (a missing file, an unknown column, template or option) end with a one-line
message and exit status 2; other failures with status 1 and a message (`loraforge --traceback ...`
shows the traceback). Heavy libraries are imported inside the commands, so `--help` is quick.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from loraforge.train.sft import EXPORT_KINDS, SFTInputError, SFTSettings

DEFAULTS = SFTSettings(model="", dataset="")
ENGINES = {  # --for: the format each engine serves best
    "vllm": ("merged_16bit", None),
    "transformers": ("merged_16bit", None),
    "llama.cpp": ("gguf", "q4_k_m"),
    "ollama": ("gguf", "q4_k_m"),
}


# --------------------------------------------------------------------------------------------
# Runtime set-up shared by the training commands
# --------------------------------------------------------------------------------------------


def prepare_runtime(verbose: bool = False) -> None:
    """Before TRL or bitsandbytes import triton: on a machine without a CUDA GPU, Triton kernels
    (TRL's, loraforge's) can only run in Triton's interpreter, which must be chosen before import.
    Then quiet the libraries' deprecation chatter unless verbose."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # bitsandbytes logs an optional CPU kernel it could not fetch, on every import.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if verbose:
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


# --------------------------------------------------------------------------------------------
# Argument types
# --------------------------------------------------------------------------------------------


def _number(kind, check, needs: str):
    """An argparse type: `kind` (int or float) for which check(value) holds, else an error saying `needs`."""

    def convert(text) -> int | float:
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None  # fmt: skip
        if not check(value):
            raise argparse.ArgumentTypeError(f"must be {needs}, got {text!r}")
        return value

    convert.__name__ = f"{kind.__name__} ({needs})"  # argparse names the type in some messages
    return convert


_positive_int = _number(int, lambda v: v >= 1, "at least 1")
_non_negative_int = _number(int, lambda v: v >= 0, "0 or more")
_positive_float = _number(float, lambda v: v > 0, "positive")
_fraction = _number(float, lambda v: 0 <= v < 1, "in [0, 1)")


def _name_list(text) -> tuple[str, ...]:
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    return tuple(str(item).strip() for item in items if str(item).strip())


_name_list.takes_lists = True  # a YAML list reaches it as a list, not as its str()


_AUTO_BOOLEANS = {"offload_embedding"}  # switches whose default, "auto", decides by the model


def _boolean(text) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# --------------------------------------------------------------------------------------------
# quickstart
# --------------------------------------------------------------------------------------------


def _quickstart(args: argparse.Namespace) -> int:
    prepare_runtime(args.verbose)
    from loraforge import quickstart

    result = quickstart.run(output=args.output, steps=args.steps, overwrite=args.overwrite, seed=args.seed,
                            threads=args.threads)  # fmt: skip
    return 0 if result["losses"][-1][1] < result["losses"][0][1] else 1


def _add_quickstart(commands) -> None:
    from loraforge.quickstart import DEFAULT_OUTPUT, DEFAULT_STEPS

    parser = commands.add_parser(
        "quickstart", help="fine-tune, merge and export a tiny model: offline, on CPU, about a minute",
        description="Builds a tiny Llama offline, loads it in 4-bit, fine-tunes LoRA adapters with TRL's SFTTrainer "
        "on bundled conversations (ChatML template, loss on the replies only), and shows the loss falling and a "
        "fixed question answered before and after. Then saves the adapter, merges it into a 16-bit checkpoint, "
        "exports GGUF (Q8_0 and Q4_K_M) with an Ollama Modelfile, and prints the same run for a real model "
        "(a `loraforge sft` command line, a YAML config and the Python code). No network, no GPU needed.",
    )  # fmt: skip
    parser.add_argument("--output", default=DEFAULT_OUTPUT, metavar="DIR",
                        help=f"folder for everything the run writes (default: ./{DEFAULT_OUTPUT})")
    parser.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS,
                        help=f"training steps of 8 conversations (default: {DEFAULT_STEPS})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier quickstart run in --output (only the files it made)")
    parser.add_argument("--seed", type=int, default=3407, help="seed for the tiny model and training (default: 3407)")
    parser.add_argument("--threads", type=_non_negative_int, default=1,
                        help="CPU threads for torch; 0 keeps torch's choice (default: 1: the tiny model's matrices "
                        "gain nothing from more, and a busy machine makes more threads much slower)")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' warnings and progress bars")
    parser.set_defaults(handler=_quickstart)  # fmt: skip


# --------------------------------------------------------------------------------------------
# sft
# --------------------------------------------------------------------------------------------


def add_lora_options(parser: argparse.ArgumentParser, d) -> None:
    """The LoRA option group that sft and grpo share; `d` holds the defaults."""
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--r", "--lora-r", dest="r", type=_positive_int, metavar="R", help=f"LoRA rank (default: {d.r})")
    lora.add_argument("--lora-alpha", type=_positive_int, metavar="ALPHA",
                      help=f"LoRA scale numerator: updates are scaled by alpha/r (default: {d.lora_alpha})")
    lora.add_argument("--lora-dropout", type=_fraction, metavar="P",
                      help=f"dropout on the LoRA input; 0 keeps the fused fast path (default: {d.lora_dropout:g})")
    lora.add_argument("--target-modules", type=_name_list, metavar="A,B,...",
                      help=f"projections to adapt (default: all 7: {','.join(d.target_modules)})")
    lora.add_argument("--use-rslora", action=argparse.BooleanOptionalAction,
                      help="rank-stabilised scaling alpha/sqrt(r) (default: off)")
    lora.add_argument("--use-gradient-checkpointing", "--gradient-checkpointing", dest="use_gradient_checkpointing",
                      choices=("unsloth", "true", "false"), help="\"unsloth\" checkpoints every layer and keeps its "
                      f"input in CPU memory; true keeps it on the GPU (default: {d.use_gradient_checkpointing})")


def add_output_options(parser: argparse.ArgumentParser, d) -> None:
    """The output option group that sft and grpo share; `d` holds the defaults."""
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", "--output", dest="output_dir", metavar="DIR",
                     help=f"adapter goes to DIR/adapter, exports beside it (default: ./{d.output_dir})")
    out.add_argument("--export", type=_name_list, metavar="LIST",
                     help=f"after training also write any of {', '.join(EXPORT_KINDS)}; gguf:QUANT picks the GGUF "
                     "quantization, e.g. merged_16bit,gguf:q4_k_m,gguf:q8_0 (bare gguf: q4_k_m) (default: none)")
    out.add_argument("--overwrite", action=argparse.BooleanOptionalAction,
                     help="replace an earlier run's files in DIR (default: off)")
    out.add_argument("--verbose", action="store_true", help="show the libraries' warnings and progress bars")


def _add_sft(commands) -> argparse.ArgumentParser:
    d = DEFAULTS
    parser = commands.add_parser(
        "sft", help="supervised fine-tuning (LoRA / QLoRA) of a model on a dataset, from flags or a YAML config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tunes LoRA adapters with TRL's SFTTrainer: loads the model (4-bit NF4 by default: QLoRA), "
        "renders each conversation with the chat template, trains, saves the adapter to OUTPUT/adapter and writes "
        "each --export beside it (OUTPUT/merged_16bit, OUTPUT/gguf, ...). The settings used are saved to "
        "OUTPUT/sft_config.yaml.\n\n"
        "Config file: --config run.yaml takes the option names below as keys (with _ or -), e.g.\n"
        "  model: meta-llama/Llama-3.1-8B-Instruct\n  dataset: chats.jsonl\n  chat_template: llama-3.1\n"
        "  responses_only: true\n  max_steps: 60\n  export: [merged_16bit, 'gguf:q4_k_m']\n"
        "Flags given on the command line win over the file.\n\n"
        "Practitioners' defaults: LoRA r=16, alpha=16, dropout 0 on all 7 projections; learning rate 2e-4 for SFT "
        "(reinforcement learning such as GRPO takes ~5e-6); \"unsloth\" (offloaded) gradient checkpointing; "
        "q4_k_m for quantized GGUF.",
    )  # fmt: skip
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of settings (keys: the option names below)")
    data = parser.add_argument_group("model and data")
    data.add_argument("--model", help="local model folder or hub name, e.g. meta-llama/Llama-3.1-8B-Instruct (required)")
    data.add_argument("--dataset", metavar="PATH", help="a .jsonl, .json, .csv or .parquet file, or a folder from "
                      "datasets' save_to_disk (required). Rows hold 'messages' or 'conversations' (role/content "
                      "messages; ShareGPT from/value is converted), or a plain 'text'")
    data.add_argument("--column", help="the column to train on (default: messages, conversations or text, "
                      "whichever exists)")
    data.add_argument("--chat-template", metavar="NAME", help="chat template to render conversations with, e.g. "
                      "chatml, llama-3.1, qwen-2.5, mistral, gemma (default: the tokenizer's own)")
    data.add_argument("--max-seq-length", type=_positive_int, metavar="N",
                      help="longer examples are cut (default: the model's context, at most 2048)")
    data.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction,
                      help="load the base in 4-bit NF4 (QLoRA); --no-load-in-4bit trains LoRA on 16-bit (default: on)")
    data.add_argument("--stream-base-weights", action=argparse.BooleanOptionalAction,
                      help="keep the 4-bit base weights in host memory and copy them to the GPU a layer at a time: "
                      "two layers' weights on the GPU instead of all, slower generation (default: off)")
    data.add_argument("--offload-embedding", action=argparse.BooleanOptionalAction,
                      help="keep the frozen input embedding table in pinned host memory, read there by the GPU: "
                      "frees its GPU memory (Llama-3 8B: 0.98 GiB) for the batch's rows over PCIe; CUDA only, not for a table "
                      "tied to the output head (default: where the table qualifies, as from_pretrained's offload_embedding=\"auto\")")
    data.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"),
                      help="compute dtype (default: auto: bfloat16 where the GPU has it, else float16; float32 on CPU)")
    add_lora_options(parser, d)
    train = parser.add_argument_group("training")
    train.add_argument("--learning-rate", "--lr", dest="learning_rate", type=_positive_float, metavar="LR",
                       help=f"peak learning rate (default: {d.learning_rate:.0e} for SFT; RL such as GRPO takes ~5e-6)".replace("e-04", "e-4"))
    train.add_argument("--per-device-train-batch-size", "--batch-size", dest="per_device_train_batch_size",
                       type=_positive_int, metavar="N", help=f"examples per step (default: {d.per_device_train_batch_size})")
    train.add_argument("--gradient-accumulation-steps", "--grad-accum", dest="gradient_accumulation_steps",
                       type=_positive_int, metavar="N",
                       help=f"steps accumulated per update (default: {d.gradient_accumulation_steps}; effective batch "
                       f"{d.per_device_train_batch_size * d.gradient_accumulation_steps})")
    train.add_argument("--max-steps", type=_positive_int, metavar="N",
                       help="optimizer updates to run; overrides --num-train-epochs (default: none, train by epochs)")
    train.add_argument("--num-train-epochs", "--epochs", dest="num_train_epochs", type=_positive_float, metavar="E",
                       help=f"passes over the dataset when --max-steps is not given (default: {d.num_train_epochs:g})")
    train.add_argument("--warmup-steps", type=_non_negative_int, metavar="N",
                       help=f"linear warm-up of the learning rate (default: {d.warmup_steps})")
    train.add_argument("--lr-scheduler-type", "--lr-scheduler", dest="lr_scheduler_type", metavar="NAME",
                       help=f"transformers scheduler: linear, cosine, constant, ... (default: {d.lr_scheduler_type})")
    train.add_argument("--weight-decay", type=float, metavar="W", help=f"AdamW weight decay (default: {d.weight_decay:g})")
    train.add_argument("--optim", metavar="NAME", help="transformers optimizer name (default: auto: adamw_8bit on a "
                       "GPU, adamw_torch on CPU)")
    train.add_argument("--seed", type=int, help=f"random seed for LoRA init and data order (default: {d.seed})")
    train.add_argument("--logging-steps", type=_positive_int, metavar="N",
                       help=f"print the loss every N steps (default: {d.logging_steps})")
    train.add_argument("--save-steps", type=_non_negative_int, metavar="N",
                       help="write a resumable checkpoint to OUTPUT/checkpoints every N steps (default: 0: none)")
    train.add_argument("--responses-only", action=argparse.BooleanOptionalAction,
                       help="compute the loss on the assistant replies only (train_on_responses_only) (default: off)")
    add_output_options(parser, d)
    parser.set_defaults(handler=_sft)  # fmt: skip
    return parser


def _option_names(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Config key -> action, for every long option of `parser` (dest names, and flags with - or _)."""
    names = {}
    for action in parser._actions:  # argparse offers no public way to walk its actions
        if action.dest in ("help", "config", "verbose", "handler"):
            continue
        names[action.dest] = action
        for flag in action.option_strings:
            if flag.startswith("--") and not flag.startswith("--no-"):
                names[flag[2:].replace("-", "_")] = action
    return names


def _config_values(path: str, parser: argparse.ArgumentParser) -> dict:
    try:
        import yaml
    except ImportError:
        raise SFTInputError("--config needs PyYAML: pip install pyyaml") from None
    file = Path(path).expanduser()
    if not file.is_file():
        raise SFTInputError(f"config file {path!r} does not exist")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise SFTInputError(f"config file {path!r} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise SFTInputError(f"config file {path!r} must hold a mapping of option: value")
    known = _option_names(parser)
    values = {}
    for key, value in data.items():
        action = known.get(str(key).replace("-", "_"))
        if action is None:
            valid = sorted({a.dest for a in known.values()})
            raise SFTInputError(f"config file {path!r}: unknown key {key!r}; valid keys: {', '.join(valid)}")
        if value is None:  # `key:` with nothing after it: the default
            continue
        try:
            if action.dest in _AUTO_BOOLEANS and str(value).strip().lower() == "auto":
                value = "auto"  # (the default; a config file may also spell it out)
            elif isinstance(action, argparse.BooleanOptionalAction):
                value = _boolean(value)
            elif getattr(action.type, "takes_lists", False):
                value = action.type(value)
            elif action.type is not None and not isinstance(value, (list, tuple)):
                value = action.type(str(value))
            if action.choices and value not in action.choices:
                raise argparse.ArgumentTypeError(f"choose from {', '.join(map(str, action.choices))}")
        except (argparse.ArgumentTypeError, ValueError) as error:
            raise SFTInputError(f"config file {path!r}: {key}: {error}") from None
        values[action.dest] = value
    return values


def merged_settings(args: argparse.Namespace, parser: argparse.ArgumentParser, cls, required=("model", "dataset")):
    """A `cls` settings dataclass: its defaults, then the config file, then the flags given."""
    import dataclasses

    values = cls(model="", dataset="").to_dict()
    if args.config:
        values.update(_config_values(args.config, parser))
    for field in dataclasses.fields(cls):
        given = getattr(args, field.name, None)
        if given is not None:
            values[field.name] = given
    for name in required:
        if not values.get(name):
            parser.error(f"--{name.replace('_', '-')} is required (or `{name}:` in the --config file)")
    for field in dataclasses.fields(cls):
        if isinstance(field.default, tuple):
            values[field.name] = tuple(values[field.name] or ())
    return cls(**values)


def sft_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> SFTSettings:
    """Dataclass defaults, then the config file, then the flags given."""
    return merged_settings(args, parser, SFTSettings)


def write_run_settings(settings, filename: str) -> Path:
    """The run's settings as YAML in its output folder. Written before anything loads, so a run that
    fails or is stopped still says how it was started."""
    import yaml

    Path(settings.output_dir).mkdir(parents=True, exist_ok=True)
    config_file = Path(settings.output_dir, filename)
    config_file.write_text(yaml.safe_dump(settings.to_dict(), sort_keys=False))
    return config_file


def _sft(args: argparse.Namespace) -> int:
    settings = sft_settings(args, args.parser)
    prepare_runtime(args.verbose)
    from loraforge.train import sft

    sft.validate(settings)  # a typo should fail before anything loads
    sft.refuse_existing_outputs(settings)
    print(f"loraforge sft: {settings.model} on {settings.dataset} -> {settings.output_dir}")
    # The environment banner (GPU, versions) comes from FastLanguageModel.from_pretrained, once.
    config_file = write_run_settings(settings, "sft_config.yaml")
    result = sft.run_sft(settings, callbacks=[sft.progress_callback()])
    print(f"\ntrained {result.trainer.state.global_step} steps in {result.seconds:.1f} s, "
          f"{result.tokens_per_second:,.0f} tokens/s; final loss {sft.final_loss(result.losses):.4f}")
    print(f"adapter: {result.adapter_dir}")
    for kind, paths in result.exports.items():
        print(f"{kind}: {', '.join(paths)}")
    print(f"settings: {config_file}")
    return 0


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


def _add_export(commands) -> None:
    parser = commands.add_parser(
        "export", help="merge a saved adapter and write it for an inference engine (merged, GGUF, Modelfile)",
        description="Writes a saved LoRA adapter (or a model folder) in the form an inference engine serves. "
        "An adapter's base model comes from its adapter_config.json (base_model_name_or_path) unless --base "
        "is given; it is merged in float32 into the base's 16-bit weights (--load-in-4bit: into the NF4-rounded "
        "weights training saw). --for picks the format each engine serves best: vllm and transformers: "
        "merged_16bit; llama.cpp: gguf q4_k_m; ollama: gguf q4_k_m with a Modelfile.",
    )  # fmt: skip
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--adapter", metavar="DIR", help="a PEFT adapter folder (e.g. the OUTPUT/adapter of sft)")
    source.add_argument("--model", metavar="DIR", help="a full model folder or hub name (no adapter)")
    parser.add_argument("--base", metavar="MODEL", help="base model for --adapter (default: the adapter's "
                        "base_model_name_or_path)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--output", metavar="DIR", help="folder to write (this or --push-to-hub is required)")
    target.add_argument("--push-to-hub", metavar="REPO", help="upload to this Hugging Face Hub model repo (owner/name "
                        "or name) instead of writing a folder; the token comes from `hf auth login` or HF_TOKEN")  # fmt: skip
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private "
                        "(default: the Hub's default; an existing repo keeps its visibility)")  # fmt: skip
    parser.add_argument("--format", choices=EXPORT_KINDS, help="merged_16bit (safetensors for vLLM and transformers), "
                        "merged_4bit (bitsandbytes NF4), lora (the adapter alone), gguf (llama.cpp, Ollama)")
    parser.add_argument("--quantization", type=_name_list, metavar="LIST", help="GGUF quantizations, e.g. "
                        "q4_k_m,q8_0,f16 (default: q4_k_m)")
    parser.add_argument("--for", dest="engine", choices=tuple(ENGINES), help="pick the format for an engine: "
                        "vllm/transformers -> merged_16bit, llama.cpp -> gguf q4_k_m, ollama -> gguf q4_k_m + Modelfile")
    parser.add_argument("--load-in-4bit", action="store_true", help="merge into the NF4-rounded base weights "
                        "(what a QLoRA adapter trained against) instead of the 16-bit ones (default: off)")
    parser.add_argument("--chat-template", metavar="NAME", help="set this chat template on the tokenizer first "
                        "(default: the one saved with the adapter or model)")
    parser.add_argument("--max-seq-length", type=_positive_int, metavar="N",
                        help="context length written to the Modelfile's num_ctx (default: the model's, at most 2048)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files in --output")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' warnings and progress bars")
    parser.set_defaults(handler=_export)  # fmt: skip


def _export_plan(args) -> tuple[str, list[str]]:
    kind, quantizations = args.format, list(args.quantization or [])
    if args.engine:
        engine_kind, engine_quantization = ENGINES[args.engine]
        if kind and kind != engine_kind:
            args.parser.error(f"--for {args.engine} writes {engine_kind}, not --format {kind}; give one of them")
        kind = engine_kind
        quantizations = quantizations or ([engine_quantization] if engine_quantization else [])
    if kind is None:
        args.parser.error("say what to write: --format {" + ",".join(EXPORT_KINDS) + "} or --for {" + ",".join(ENGINES) + "}")
    if quantizations and kind != "gguf":
        args.parser.error(f"--quantization applies to gguf only, not {kind}")
    if kind == "lora" and not args.adapter:
        args.parser.error("--format lora needs --adapter (a model folder has no adapter to write)")
    if not args.adapter and not args.model:
        args.parser.error("give --adapter DIR (a saved LoRA adapter) or --model DIR")
    return kind, quantizations or (["q4_k_m"] if kind == "gguf" else [])


def _load_for_export(args):
    import torch

    from loraforge.models import FastLanguageModel

    base = args.model
    if args.adapter:
        config_file = Path(args.adapter).expanduser() / "adapter_config.json"
        if not config_file.is_file():
            raise SFTInputError(f"{args.adapter!r} is not a LoRA adapter folder (no adapter_config.json); "
                                "use --model for a full model folder")  # fmt: skip
        base = args.base or json.loads(config_file.read_text()).get("base_model_name_or_path")
        if not base:
            raise SFTInputError(f"{config_file} names no base model; pass --base MODEL")
    from loraforge.train.sft import check_model_source

    check_model_source(base)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base)
    except OSError as error:
        raise SFTInputError(f"could not load base model {base!r}: {error}") from None
    stored = vars(config).get("dtype") or vars(config).get("torch_dtype")
    # Load in the checkpoint's own 16-bit dtype (merging happens in float32 one tensor at a time anyway).
    dtype = stored if stored in (torch.bfloat16, torch.float16, torch.float32) else {
        "bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(stored).replace("torch.", ""), torch.float32)  # fmt: skip
    model, tokenizer = FastLanguageModel.from_pretrained(base, dtype=dtype, load_in_4bit=args.load_in_4bit,
                                                         max_seq_length=args.max_seq_length)  # fmt: skip
    if args.adapter:
        from peft import PeftModel
        from transformers import AutoTokenizer

        adapter = str(Path(args.adapter).expanduser())
        if Path(adapter, "tokenizer_config.json").is_file():  # saved with the adapter: has its chat template
            tokenizer = AutoTokenizer.from_pretrained(adapter)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        model = PeftModel.from_pretrained(model, adapter)
    if args.chat_template:
        from loraforge.data import get_chat_template

        try:
            tokenizer = get_chat_template(tokenizer, args.chat_template)
        except ValueError as error:
            raise SFTInputError(str(error)) from None
    return model, tokenizer


def _export(args: argparse.Namespace) -> int:
    kind, quantizations = _export_plan(args)
    if args.push_to_hub:
        return _push_export(args, kind, quantizations)
    if args.private:
        args.parser.error("--private applies to --push-to-hub only")
    output = Path(args.output).expanduser()
    if kind != "gguf" and output.is_dir() and any(output.iterdir()) and not args.overwrite:
        raise SFTInputError(f"{output} exists and is not empty; pass --overwrite or choose another --output")
    prepare_runtime(args.verbose)
    from loraforge.export import save_pretrained_gguf, save_pretrained_merged
    from loraforge.train.sft import parse_export_targets

    parse_export_targets([f"gguf:{q}" for q in quantizations])  # names checked before the model loads
    model, tokenizer = _load_for_export(args)
    if kind == "gguf":
        from loraforge.export.modelfile import modelfile_paths

        modelfile = args.engine != "llama.cpp"
        paths = save_pretrained_gguf(model, output, tokenizer, quantization_method=quantizations,
                                     overwrite=args.overwrite, write_modelfile=modelfile)  # fmt: skip
        paths += [str(path) for path, _ in modelfile_paths(paths)] if modelfile else []
    else:
        paths = [save_pretrained_merged(model, output, tokenizer, save_method=kind, overwrite=args.overwrite)]
    for path in paths:
        print(f"wrote {path}")
    print(_serving_hint(kind, paths, output, args.engine))
    return 0


def _push_export(args: argparse.Namespace, kind: str, quantizations: list[str]) -> int:
    from loraforge.export.hub import check_repo_id, resolve_token

    try:
        check_repo_id(args.push_to_hub)
    except ValueError as error:
        raise SFTInputError(str(error)) from None
    token = resolve_token()  # no login fails here, before the model loads
    prepare_runtime(args.verbose)
    from loraforge.export import push_to_hub_gguf, push_to_hub_merged
    from loraforge.train.sft import parse_export_targets

    parse_export_targets([f"gguf:{q}" for q in quantizations])
    model, tokenizer = _load_for_export(args)
    private = True if args.private else None
    if kind == "gguf":
        commit = push_to_hub_gguf(model, args.push_to_hub, tokenizer, quantizations, token=token, private=private,
                                  write_modelfile=args.engine != "llama.cpp")  # fmt: skip
    else:
        commit = push_to_hub_merged(model, args.push_to_hub, tokenizer, kind, token=token, private=private)
    print(f"pushed to {commit.repo_url}\ncommit: {commit.commit_url}")
    return 0


def _serving_hint(kind: str, paths: list[str], output: Path, engine: str | None) -> str:
    if kind == "gguf":
        hint = f"llama.cpp: llama-cli -m {paths[0]} -cnv"
        if engine != "llama.cpp":
            hint += f"\nOllama:    ollama create {output.resolve().name} -f {output / 'Modelfile'}"
        return hint
    if kind == "lora":
        return f"PEFT: PeftModel.from_pretrained(base_model, '{paths[0]}')"
    return (f"vLLM: vllm serve {paths[0]}\ntransformers: AutoModelForCausalLM.from_pretrained('{paths[0]}')")


# --------------------------------------------------------------------------------------------
# env, demo
# --------------------------------------------------------------------------------------------


def _env(args: argparse.Namespace) -> int:
    from loraforge.env_report import collect, format_report

    report = collect()
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from loraforge import demo

    result = demo.run(steps=args.steps, seed=args.seed)
    return 0 if result["bit_exact"] and result["losses"][-1] < result["losses"][0] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraforge", description="Fast, exact LoRA / QLoRA fine-tuning, merging "
                                     "and export. Start with `loraforge quickstart`.")  # fmt: skip
    parser.add_argument("--traceback", action="store_true", help="show the full traceback when a command fails")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_quickstart(commands)
    sft_parser = _add_sft(commands)
    sft_parser.set_defaults(parser=sft_parser)
    from loraforge.cli_grpo import add_grpo

    grpo_parser = add_grpo(commands)
    grpo_parser.set_defaults(parser=grpo_parser)
    _add_export(commands)
    commands.choices["export"].set_defaults(parser=commands.choices["export"])
    env = commands.add_parser("env", help="GPU, library versions, loraforge's CUDA build, and what does not fit",
                              description="Reports the GPU (name, compute capability, bf16, free memory), the "
                              "versions of torch, triton, bitsandbytes, transformers, peft and trl, whether "
                              "loraforge's _core holds CUDA code for this GPU, and a warning for each mismatch.")  # fmt: skip
    env.add_argument("--json", action="store_true", help="print the report as JSON")
    env.set_defaults(handler=_env)
    demo = commands.add_parser("demo", help="the NF4 demo: quantize a tiny model, check it against bitsandbytes, train",
                               description="Builds a tiny Llama offline, quantizes its linear weights to NF4 with "
                               "loraforge's kernels (checked byte for byte against bitsandbytes) and trains it for a "
                               "few steps, showing the loss fall.")  # fmt: skip
    demo.add_argument("--steps", type=_positive_int, default=40, help="training steps (default: 40)")
    demo.add_argument("--seed", type=int, default=0, help="random seed for the model (default: 0)")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed by argparse
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    name = f"loraforge {args.command}"
    try:
        return args.handler(args)
    except SystemExit as exit_:  # parser.error() inside a handler
        return exit_.code if isinstance(exit_.code, int) else 2
    except (SFTInputError, FileExistsError, NotADirectoryError, IsADirectoryError) as error:
        if args.traceback:
            raise
        print(f"{name}: error: {str(error).replace('pass overwrite=True', 'pass --overwrite')}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, NotImplementedError, RuntimeError, ImportError) as error:
        if args.traceback:
            raise
        print(f"{name}: error: {type(error).__name__}: {error}\n"
              f"(`loraforge --traceback {args.command} ...` shows where it came from)", file=sys.stderr)  # fmt: skip
        return 1
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
