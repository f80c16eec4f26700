"""GRPO from a handful of settings: what `loraforge grpo` runs.

    settings = GRPOSettings(model="Qwen/Qwen2.5-1.5B-Instruct", dataset="gsm8k.jsonl",
                            rewards=("xml_tags:0.5", "numeric_answer:2"), max_steps=250)
    result = run_grpo(settings)           # adapter in outputs/adapter, exports beside it

The steps mirror `sft.run_sft` and share its pieces (model loading with LoRA and the chat template,
dataset files, adapter saving, export): `load_prompts` reads the prompt column (plain text becomes a
one-turn conversation when the tokenizer has a chat template, with the system prompt in front) and
drops prompts longer than max_prompt_length tokens; `reward_functions` builds the named rewards of
`loraforge.rewards`; `build_grpo_trainer` is loraforge's GRPOTrainer (train/grpo.py) with those
settings. Reward weights go to GRPOConfig.reward_weights, so TRL logs each reward on its own as well
as their weighted sum ("reward"). Mistakes in what the user asked for raise `SFTInputError`, the
shared "fix your input" error the CLI prints without a traceback.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from loraforge import distributed as lfd
from loraforge.train.sft import DEFAULT_TARGETS, SFTInputError

__all__ = ["REWARDS", "GRPOResult", "GRPOSettings", "build_grpo_trainer", "load_prompts", "parse_rewards",
           "reward_functions", "run_grpo", "validate"]  # fmt: skip

# Name -> what it scores. Aliases are accepted too (REWARD_ALIASES).
REWARDS = {
    "format": "1 when the reply matches --format-pattern (a regular expression, searched anywhere)",
    "xml_tags": "partial credit for <tag>...</tag> blocks present and in order (--xml-tags)",
    "exact_answer": "1 when the reply's answer equals the answer column (case/space-insensitive)",
    "numeric_answer": "1 when the number in the reply's answer is within --numeric-tolerance of the answer column",
    "length": "1 at --length-target (in --length-unit), falling linearly to 0 at twice or zero the target",
}
REWARD_ALIASES = {"xml": "xml_tags", "exact": "exact_answer", "numeric": "numeric_answer", "number": "numeric_answer"}
NEEDS_ANSWER = ("exact_answer", "numeric_answer")
DEFAULT_FORMAT_PATTERN = r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>"
LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")  # the ones tests/train/test_grpo.py checks against TRL


@dataclasses.dataclass
class GRPOSettings:
    """Everything one GRPO run needs. Defaults: Unsloth's GRPO notebooks' where TRL's differ."""

    model: str
    dataset: str
    output_dir: str = "outputs"
    prompt_column: str = "prompt"
    answer_column: str = "answer"  # read by exact_answer and numeric_answer
    system_prompt: str | None = None
    chat_template: str | None = None  # None: the tokenizer's own template
    max_seq_length: int | None = None  # None: the model's context, at most 2048
    load_in_4bit: bool = True
    stream_base_weights: bool = False  # NF4 base weights in host memory, a layer at a time on the GPU
    offload_embedding: bool | str = "auto"  # the input embedding table in pinned host memory ("auto": where it can)
    dtype: str = "auto"
    r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    use_gradient_checkpointing: str = "unsloth"
    use_rslora: bool = False
    rewards: tuple[str, ...] = ()  # "name" or "name:weight"
    format_pattern: str = DEFAULT_FORMAT_PATTERN
    xml_tags: tuple[str, ...] = ("reasoning", "answer")
    numeric_tolerance: float = 1e-6
    length_target: int | None = None
    length_unit: str = "tokens"
    num_generations: int = 4
    max_prompt_length: int = 256
    max_completion_length: int = 256
    loss_type: str = "dapo"
    beta: float = 0.0
    temperature: float = 1.0
    learning_rate: float = 5e-6
    per_device_train_batch_size: int | None = None  # None: num_generations (one prompt per step)
    gradient_accumulation_steps: int = 1
    max_steps: int | None = None
    num_train_epochs: float = 1.0
    warmup_ratio: float = 0.1
    lr_scheduler_type: str = "cosine"
    weight_decay: float = 0.1
    max_grad_norm: float = 0.1
    optim: str = "auto"
    seed: int = 3407
    logging_steps: int = 1
    save_steps: int = 0
    export: tuple[str, ...] = ()
    overwrite: bool = False

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    @property
    def batch_size(self) -> int:
        return self.per_device_train_batch_size or self.num_generations


@dataclasses.dataclass
class GRPOResult:
    model: object
    tokenizer: object
    trainer: object
    rewards: list[tuple[int, float]]  # (step, mean reward) as logged
    seconds: float  # training only
    tokens: int  # prompt and completion tokens processed
    adapter_dir: str
    exports: dict[str, list[str]]
    prompts_dropped: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------


def parse_rewards(spec) -> list[tuple[str, float]]:
    """("xml_tags:0.5", "numeric") or "xml_tags:0.5,numeric" -> [("xml_tags", 0.5), ("numeric_answer", 1.0)]."""
    items = spec.split(",") if isinstance(spec, str) else [part for item in spec for part in str(item).split(",")]
    parsed: list[tuple[str, float]] = []
    for item in (part.strip() for part in items):
        if not item:
            continue
        name, _, weight_text = item.partition(":")
        name = name.strip().lower().replace("-", "_")
        name = REWARD_ALIASES.get(name, name.removesuffix("_reward"))
        if name not in REWARDS:
            raise SFTInputError(f"unknown reward {item.partition(':')[0]!r}; choose from {', '.join(REWARDS)} "
                                f"(aliases: {', '.join(REWARD_ALIASES)})")  # fmt: skip
        try:
            weight = float(weight_text) if weight_text.strip() else 1.0
        except ValueError:
            raise SFTInputError(f"reward {item!r}: the weight after ':' must be a number") from None
        if not math.isfinite(weight):
            raise SFTInputError(f"reward {item!r}: the weight must be finite")
        if any(name == seen for seen, _ in parsed):
            raise SFTInputError(f"reward {name!r} is given twice; give it once with the summed weight")
        parsed.append((name, weight))
    if not parsed:
        raise SFTInputError(f"no reward function given; pass --rewards with any of {', '.join(REWARDS)}, "
                            "e.g. --rewards xml_tags:0.5,numeric_answer:2")  # fmt: skip
    return parsed


def reward_functions(settings: GRPOSettings) -> tuple[list, list[float]]:
    """(reward functions in TRL's shape, their weights), from settings.rewards."""
    from loraforge import rewards

    functions, weights = [], []
    for name, weight in parse_rewards(settings.rewards):
        if name == "format":
            function = rewards.format_reward(settings.format_pattern, mode="search")
        elif name == "xml_tags":
            function = rewards.xml_tags_reward(settings.xml_tags)
        elif name == "exact_answer":
            function = rewards.exact_answer_reward(settings.answer_column)
        elif name == "numeric_answer":
            function = rewards.numeric_answer_reward(settings.answer_column, tolerance=settings.numeric_tolerance)
        else:
            function = rewards.length_reward(settings.length_target, unit=settings.length_unit)
        functions.append(function)
        weights.append(weight)
    return functions, weights


# --------------------------------------------------------------------------------------------
# Checks before anything loads
# --------------------------------------------------------------------------------------------


def validate(settings: GRPOSettings) -> None:
    """The checks that need no model or data loaded (the shared ones in sft.validate, then GRPO's)."""
    import re

    from loraforge.train import sft

    sft.validate(settings)
    names = [name for name, _ in parse_rewards(settings.rewards)]
    if "format" in names:
        try:
            re.compile(settings.format_pattern)
        except re.error as error:
            raise SFTInputError(f"--format-pattern {settings.format_pattern!r} is not a regular expression: {error}")
    if "length" in names and settings.length_target is None:
        raise SFTInputError("reward 'length' needs --length-target N (the length to aim for, in --length-unit)")
    try:
        reward_functions(settings)  # the factories check their own arguments (tags, tolerance, unit)
    except (TypeError, ValueError) as error:
        raise SFTInputError(f"rewards: {error}") from None
    if settings.loss_type not in LOSS_TYPES:
        raise SFTInputError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {settings.loss_type!r}")
    if settings.num_generations < 2:
        raise SFTInputError("num_generations must be at least 2: GRPO compares completions of the same prompt")
    generated = settings.batch_size * settings.gradient_accumulation_steps
    if generated % settings.num_generations:
        raise SFTInputError(f"per_device_train_batch_size x gradient_accumulation_steps ({generated}) must be a "
                            f"multiple of num_generations ({settings.num_generations}): each step generates whole "
                            "groups of completions per prompt")  # fmt: skip


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def load_prompts(settings: GRPOSettings, tokenizer):
    """(Dataset with a "prompt" column and the others kept for the rewards, number of prompts dropped
    for being longer than settings.max_prompt_length tokens)."""
    from loraforge.data import standardize_sharegpt
    from loraforge.train import sft

    table = sft.load_table(settings.dataset)
    check_columns(table.column_names, settings)
    column = settings.prompt_column
    if column != "prompt":
        if "prompt" in table.column_names:
            table = table.remove_columns("prompt")
        table = table.rename_column(column, "prompt")
    templated = bool(getattr(tokenizer, "chat_template", None))
    first = table[0]["prompt"]
    if isinstance(first, str):
        if templated:
            system = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []
            table = table.map(lambda row: {"prompt": [*system, {"role": "user", "content": row["prompt"]}]})
        elif settings.system_prompt:
            raise SFTInputError("--system-prompt needs a chat template; pass --chat-template NAME (e.g. chatml)")
    elif isinstance(first, list):
        if not templated:
            raise SFTInputError(f"column {column!r} holds conversations but the tokenizer has no chat template; "
                                "pass --chat-template NAME (e.g. chatml)")  # fmt: skip
        try:
            table = standardize_sharegpt(table, column="prompt")
        except ValueError as error:
            raise SFTInputError(f"column {column!r}: {error}") from None
        if settings.system_prompt:
            system = {"role": "system", "content": settings.system_prompt}
            table = table.map(lambda row: {"prompt": row["prompt"] if row["prompt"][0]["role"] == "system"
                                           else [system, *row["prompt"]]})  # fmt: skip
    else:
        raise SFTInputError(f"column {column!r} must hold text or lists of chat messages, "
                            f"got {type(first).__name__}")  # fmt: skip

    def prompt_length(row) -> dict:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            return {"n": len(tokenizer(prompt)["input_ids"])}
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return {"n": len(tokenizer(text, add_special_tokens=False)["input_ids"])}

    try:
        lengths = table.map(prompt_length, remove_columns=table.column_names)["n"]
    except Exception as error:  # noqa: BLE001 - a template that rejects the data raises anything
        raise SFTInputError(f"could not render column {column!r} with the chat template: {error}") from None
    keep = [i for i, n in enumerate(lengths) if n <= settings.max_prompt_length]
    if not keep:
        raise SFTInputError(f"every prompt is longer than --max-prompt-length {settings.max_prompt_length} tokens "
                            f"(shortest: {min(lengths)}); raise it")  # fmt: skip
    return table.select(keep), len(lengths) - len(keep)


def check_columns(columns: list[str], settings: GRPOSettings) -> None:
    if settings.prompt_column not in columns:
        raise SFTInputError(f"dataset has no column {settings.prompt_column!r} for the prompts; its columns are "
                            f"{columns}. Pass --prompt-column NAME")  # fmt: skip
    needing = [name for name, _ in parse_rewards(settings.rewards) if name in NEEDS_ANSWER]
    if needing and settings.answer_column not in columns:
        raise SFTInputError(f"reward {needing[0]!r} compares with the answer column {settings.answer_column!r}, "
                            f"which the dataset lacks; its columns are {columns}. Pass --answer-column NAME")  # fmt: skip


# --------------------------------------------------------------------------------------------
# Trainer and run
# --------------------------------------------------------------------------------------------


def build_grpo_trainer(model, tokenizer, train_dataset, settings: GRPOSettings, callbacks=()):
    import trl
    from transformers.trainer_callback import PrinterCallback

    from loraforge.train.grpo import GRPOTrainer
    from loraforge.train.sft import _optimizer

    functions, weights = reward_functions(settings)
    on_gpu = torch.cuda.is_available()
    bf16 = on_gpu and torch.cuda.is_bf16_supported() and settings.dtype in ("auto", "bfloat16", "bf16")
    args = trl.GRPOConfig(
        ddp_find_unused_parameters=False,  # every LoRA parameter gets a gradient each step
        output_dir=str(Path(settings.output_dir) / "checkpoints"),
        max_steps=settings.max_steps if settings.max_steps else -1,
        num_train_epochs=settings.num_train_epochs,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_ratio,  # transformers 5: a float below 1 is a fraction of the steps
        lr_scheduler_type=settings.lr_scheduler_type,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        optim=_optimizer(settings.optim),
        seed=settings.seed,
        logging_steps=settings.logging_steps,
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or 500,
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        temperature=settings.temperature,
        loss_type=settings.loss_type,
        beta=settings.beta,
        reward_weights=weights,
        bf16=bf16,
        fp16=on_gpu and not bf16 and settings.dtype != "float32",
        use_cpu=not on_gpu,
        report_to=[],
        disable_tqdm=True,
    )  # fmt: skip
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=functions, args=args,
                          train_dataset=train_dataset, callbacks=list(callbacks))  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    return trainer


def logged(trainer, key: str) -> list[tuple[int, float]]:
    return [(entry["step"], entry[key]) for entry in trainer.state.log_history if key in entry]


def run_grpo(settings: GRPOSettings, callbacks=(), say=None) -> GRPOResult:
    """Load, read the prompts, train, save the adapter (output_dir/adapter), export what settings.export asks.
    `say` (e.g. print), if given, is told before training how many prompts were left out as too long."""
    from loraforge.train import sft

    validate(settings)
    targets = sft.parse_export_targets(settings.export)
    sft.refuse_existing_outputs(settings)
    check_columns(sft.load_table(settings.dataset).column_names, settings)  # before the model loads
    model, tokenizer = sft.load_model(settings)
    context = getattr(model, "max_seq_length", None)
    if context and settings.max_prompt_length + settings.max_completion_length > context:
        raise SFTInputError(f"max_prompt_length + max_completion_length ({settings.max_prompt_length} + "
                            f"{settings.max_completion_length}) exceeds the context of {context} tokens; lower "
                            "them or raise --max-seq-length")  # fmt: skip
    dataset, dropped = load_prompts(settings, tokenizer)
    if dropped and say is not None:
        say(f"{dropped} of {len(dataset) + dropped} prompts are longer than {settings.max_prompt_length} tokens "
            "(--max-prompt-length) and are left out")  # fmt: skip
    trainer = build_grpo_trainer(model, tokenizer, dataset, settings, callbacks)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = logged(trainer, "num_tokens")
    adapter_dir = lfd.save_on_main(sft.save_adapter)(model, tokenizer, settings.output_dir, settings.overwrite)
    exports = lfd.save_on_main(sft.export_model)(model, tokenizer, settings.output_dir, targets,
                                                 overwrite=settings.overwrite)  # fmt: skip
    lfd.finish_distributed()
    return GRPOResult(model, tokenizer, trainer, logged(trainer, "reward"), seconds,
                      int(tokens[-1][1]) if tokens else 0, adapter_dir, exports, dropped)  # fmt: skip
