"""`loraforge grpo`: reinforcement learning (GRPO) of LoRA adapters from flags or a YAML config.

    loraforge grpo --model Qwen/Qwen2.5-1.5B-Instruct --dataset gsm8k.jsonl --prompt-column question \\
                   --rewards xml_tags:0.5,numeric_answer:2 --max-steps 250
    loraforge grpo --config grpo.yaml --beta 0.04       # flags win over the YAML file

The options follow `loraforge sft` (same model, LoRA and output options; same YAML rules); the run is
train/grpo_run.py's `run_grpo`, with loraforge's GRPOTrainer (train/grpo.py).
"""

from __future__ import annotations

import argparse

from loraforge.cli import (
    _fraction,
    _name_list,
    _non_negative_int,
    _number,
    _positive_float,
    _positive_int,
    add_lora_options,
    add_output_options,
    merged_settings,
    prepare_runtime,
    write_run_settings,
)
from loraforge.train.grpo_run import LOSS_TYPES, REWARD_ALIASES, REWARDS, GRPOSettings

DEFAULTS = GRPOSettings(model="", dataset="")
_at_least_2 = _number(int, lambda v: v >= 2, "at least 2")
_non_negative_float = _number(float, lambda v: v >= 0, "0 or more")


def _short(number: float) -> str:
    """5e-06 -> "5e-6"."""
    mantissa, _, exponent = f"{number:.0e}".partition("e")
    return f"{mantissa}e{int(exponent)}"


def _reward_list(value) -> tuple[str, ...]:
    """From "xml_tags:0.5,numeric", a YAML list of such, or a YAML mapping {name: weight}."""
    if isinstance(value, dict):
        return tuple(f"{name}:{weight}" for name, weight in value.items())
    return _name_list(value)


_reward_list.takes_lists = True


def add_grpo(commands) -> argparse.ArgumentParser:
    d = DEFAULTS
    rewards = "\n".join(f"  {name:15} {what}" for name, what in REWARDS.items())
    parser = commands.add_parser(
        "grpo", help="reinforcement learning (GRPO) of LoRA / QLoRA adapters with reward functions, from flags "
        "or a YAML config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Trains LoRA adapters with GRPO (TRL's GRPOTrainer, with loraforge's memory-saving scoring): "
        "for each prompt the model samples --num-generations completions, the reward functions score them, and "
        "completions better than their group's mean are made more likely. Loads the model like `loraforge sft` "
        "(4-bit NF4 by default: QLoRA), saves the adapter to OUTPUT/adapter, writes each --export beside it and "
        "the settings used to OUTPUT/grpo_config.yaml.\n\n"
        "Dataset: one prompt per row in --prompt-column, as text (sent as one user turn, after --system-prompt, "
        "through the chat template) or as a list of chat messages. Every other column reaches the reward "
        "functions; --answer-column holds the reference answers the answer rewards compare with.\n\n"
        f"Rewards (--rewards NAME[:WEIGHT],...; weight default 1; aliases {', '.join(REWARD_ALIASES)}):\n"
        f"{rewards}\n"
        "An answer is read from the reply's last <answer>...</answer>, else \\boxed{...}, else what follows "
        "'####', else the whole reply.\n\n"
        "Config file: --config grpo.yaml takes the option names below as keys (with _ or -), e.g.\n"
        "  model: Qwen/Qwen2.5-1.5B-Instruct\n  dataset: gsm8k.jsonl\n  prompt_column: question\n"
        "  rewards: {xml_tags: 0.5, numeric_answer: 2.0}\n  max_steps: 250\n"
        "Flags given on the command line win over the file.\n\n"
        "Practitioners' defaults (Unsloth's GRPO notebooks): learning rate 5e-6 with cosine decay after 10% "
        "warm-up, weight decay 0.1, gradient clipping at 0.1, LoRA r=16 on all 7 projections, no KL term "
        "(beta 0), TRL's dapo loss.",
    )  # fmt: skip
    # fmt: off
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of settings (keys: the option names below)")
    data = parser.add_argument_group("model and data")
    data.add_argument("--model", help="local model folder or hub name, e.g. Qwen/Qwen2.5-1.5B-Instruct (required)")
    data.add_argument("--dataset", metavar="PATH", help="a .jsonl, .json, .csv or .parquet file, or a folder from "
                      "datasets' save_to_disk (required)")
    data.add_argument("--prompt-column", metavar="NAME",
                      help=f"column of prompts: text or lists of chat messages (default: {d.prompt_column})")
    data.add_argument("--answer-column", metavar="NAME", help="column of reference answers, read by exact_answer "
                      f"and numeric_answer (default: {d.answer_column})")
    data.add_argument("--system-prompt", metavar="TEXT", help="system message put before each prompt that has "
                      "none, e.g. the answer format the rewards look for (default: none)")
    data.add_argument("--chat-template", metavar="NAME", help="chat template to render prompts with, e.g. "
                      "chatml, llama-3.1, qwen-2.5, gemma (default: the tokenizer's own)")
    data.add_argument("--max-seq-length", type=_positive_int, metavar="N", help="context length to load the model "
                      "with; must hold prompt + completion (default: the model's context, at most 2048)")
    data.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction,
                      help="load the base in 4-bit NF4 (QLoRA); --no-load-in-4bit trains LoRA on 16-bit (default: on)")
    data.add_argument("--stream-base-weights", action=argparse.BooleanOptionalAction,
                      help="keep the 4-bit base weights in host memory and copy them to the GPU a layer at a time: "
                      "two layers' weights on the GPU instead of all, slower generation (default: off)")
    data.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"),
                      help="compute dtype (default: auto: bfloat16 where the GPU has it, else float16; float32 on CPU)")
    reward = parser.add_argument_group("rewards")
    reward.add_argument("--rewards", "--reward", dest="rewards", type=_reward_list, metavar="NAME[:W],...",
                        help=f"reward functions and weights, e.g. xml_tags:0.5,numeric_answer:2; names: "
                        f"{', '.join(REWARDS)} (required)")
    reward.add_argument("--format-pattern", metavar="REGEX", help="regular expression the format reward searches "
                        f"the reply for (default: {d.format_pattern})")
    reward.add_argument("--xml-tags", type=_name_list, metavar="A,B,...",
                        help=f"tags the xml_tags reward wants, in order (default: {','.join(d.xml_tags)})")
    reward.add_argument("--numeric-tolerance", type=_non_negative_float, metavar="T",
                        help=f"largest |reply - answer| numeric_answer accepts (default: {d.numeric_tolerance:g})")
    reward.add_argument("--length-target", type=_non_negative_int, metavar="N",
                        help="length the length reward aims for (required with the length reward)")
    reward.add_argument("--length-unit", choices=("tokens", "words", "chars"),
                        help=f"unit of --length-target (default: {d.length_unit})")
    add_lora_options(parser, d)
    grpo = parser.add_argument_group("GRPO")
    grpo.add_argument("--num-generations", type=_at_least_2, metavar="G",
                      help=f"completions sampled per prompt, compared with each other (default: {d.num_generations})")
    grpo.add_argument("--max-prompt-length", type=_positive_int, metavar="N", help="prompts longer than N tokens "
                      f"(chat template included) are left out, with a count (default: {d.max_prompt_length})")
    grpo.add_argument("--max-completion-length", type=_positive_int, metavar="N",
                      help=f"most tokens generated per completion (default: {d.max_completion_length})")
    grpo.add_argument("--loss-type", choices=LOSS_TYPES, help="how token losses are averaged: dapo (over all "
                      "tokens of the batch), grpo (per completion, then over completions), bnpo (over the tokens of "
                      f"the local batch), dr_grpo (by a constant) (default: {d.loss_type})")
    grpo.add_argument("--beta", type=_non_negative_float, metavar="B", help="weight of the KL penalty to the "
                      f"starting model; 0 skips the reference model (default: {d.beta:g})")
    grpo.add_argument("--temperature", type=_positive_float, metavar="T",
                      help=f"sampling temperature of the completions (default: {d.temperature:g})")
    train = parser.add_argument_group("training")
    train.add_argument("--learning-rate", "--lr", dest="learning_rate", type=_positive_float, metavar="LR",
                       help=f"peak learning rate (default: {_short(d.learning_rate)}; SFT takes ~2e-4)")
    train.add_argument("--per-device-train-batch-size", "--batch-size", dest="per_device_train_batch_size",
                       type=_positive_int, metavar="N", help="completions per step; with --gradient-accumulation-steps "
                       "a multiple of --num-generations (default: --num-generations, i.e. one prompt per step)")
    train.add_argument("--gradient-accumulation-steps", "--grad-accum", dest="gradient_accumulation_steps",
                       type=_positive_int, metavar="N",
                       help=f"steps accumulated per update (default: {d.gradient_accumulation_steps})")
    train.add_argument("--max-steps", type=_positive_int, metavar="N",
                       help="optimizer updates to run; overrides --num-train-epochs (default: none, train by epochs)")
    train.add_argument("--num-train-epochs", "--epochs", dest="num_train_epochs", type=_positive_float, metavar="E",
                       help=f"passes over the prompts when --max-steps is not given (default: {d.num_train_epochs:g})")
    train.add_argument("--warmup-ratio", type=_fraction, metavar="F",
                       help=f"fraction of the steps spent warming the learning rate up (default: {d.warmup_ratio:g})")
    train.add_argument("--lr-scheduler-type", "--lr-scheduler", dest="lr_scheduler_type", metavar="NAME",
                       help=f"transformers scheduler: linear, cosine, constant, ... (default: {d.lr_scheduler_type})")
    train.add_argument("--weight-decay", type=_non_negative_float, metavar="W",
                       help=f"AdamW weight decay (default: {d.weight_decay:g})")
    train.add_argument("--max-grad-norm", type=_non_negative_float, metavar="N",
                       help=f"gradient clipping norm; 0 turns clipping off (default: {d.max_grad_norm:g})")
    train.add_argument("--optim", metavar="NAME", help="transformers optimizer name (default: auto: adamw_8bit on a "
                       "GPU, adamw_torch on CPU)")
    train.add_argument("--seed", type=int, help=f"random seed for LoRA init, data order and sampling (default: {d.seed})")
    train.add_argument("--logging-steps", type=_positive_int, metavar="N",
                       help=f"print loss and mean reward every N steps (default: {d.logging_steps})")
    train.add_argument("--save-steps", type=_non_negative_int, metavar="N",
                       help="write a resumable checkpoint to OUTPUT/checkpoints every N steps (default: 0: none)")
    # fmt: on
    add_output_options(parser, d)
    parser.set_defaults(handler=_grpo)
    return parser


def grpo_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> GRPOSettings:
    return merged_settings(args, parser, GRPOSettings, required=("model", "dataset", "rewards"))


def _grpo(args: argparse.Namespace) -> int:
    settings = grpo_settings(args, args.parser)
    prepare_runtime(args.verbose)
    from loraforge.train import grpo_run, sft

    grpo_run.validate(settings)  # a typo should fail before anything loads
    sft.refuse_existing_outputs(settings)
    print(f"loraforge grpo: {settings.model} on {settings.dataset} -> {settings.output_dir}")
    # The environment banner (GPU, versions) comes from FastLanguageModel.from_pretrained, once.
    config_file = write_run_settings(settings, "grpo_config.yaml")
    result = grpo_run.run_grpo(settings, callbacks=[sft.progress_callback(extra=("reward",))], say=print)
    print(summary(result, config_file))
    return 0


def summary(result, config_file) -> str:
    """Steps, time, tokens/s, mean reward at the first and last logged step, and where the files are."""
    speed = f"{result.tokens_per_second:,.0f} tokens/s (prompts and completions)"
    lines = [f"\ntrained {result.trainer.state.global_step} steps in {result.seconds:.1f} s, {speed}"]
    if result.rewards:
        (first_step, first), (last_step, last) = result.rewards[0], result.rewards[-1]
        lines.append(f"mean reward {first:.4f} at step {first_step} -> {last:.4f} at step {last_step}")
    lines.append(f"adapter: {result.adapter_dir}")
    lines += [f"{kind}: {', '.join(paths)}" for kind, paths in result.exports.items()]
    lines.append(f"settings: {config_file}")
    return "\n".join(lines)
