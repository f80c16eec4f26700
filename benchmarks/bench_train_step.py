"""One QLoRA training step of a Llama-3.1-8B-shaped model (random weights): transformers + PEFT +
bitsandbytes, the same with Liger-Kernel, Unsloth, and loraforge, each in its own process, in one
run. Batch 2 x 2,048 tokens, r=16 / alpha=16 on all seven projections, AdamW (torch's fused one, what
transformers' Trainer and TRL use by default since their optim became adamw_torch_fused), gradient
checkpointing (each library's recommended kind), SDPA attention. Reports tokens/s over the timed
steps, peak GPU memory (weights included), and the loss of the first and last step.

    python benchmarks/bench_train_step.py [--layers 32] [--steps 5] [--out DIR]

The parent writes one random bf16 checkpoint to disk; every variant loads it the way its users do
(from_pretrained with 4-bit NF4 and double quantization), so all train the same weights. The
limit column is 6 x 8e9 FLOP per token (forward, backward and recompute) at the measured bf16
matmul rate.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import harness

IMPLS = ("hf", "liger", "unsloth", "loraforge")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_config(shape: str, layers: int | None = None):
    """A Llama-3.x-shaped config: "8b" (Llama-3.1-8B) or "1b" (Llama-3.2-1B: hidden 2,048, tied head), with
    `layers` decoder layers (default: the model's own, 32 and 16)."""
    if shape == "8b":
        return llama8b_config(32 if layers is None else layers)
    if shape != "1b":
        raise ValueError(f"shape must be '8b' or '1b', got {shape!r}")
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16 if layers is None else layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=True, torch_dtype="bfloat16",
    )  # fmt: skip


def parameter_count(config) -> float:
    """Parameters of the model `config` describes (embeddings and head included, a tied head once)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return float(sum(p.numel() for p in model.parameters()))


def llama8b_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False, torch_dtype="bfloat16",
    )  # fmt: skip


def write_checkpoint(folder: Path, layers: int | None, shape: str = "8b", tokenizer: bool = True) -> None:
    """The random Llama-shaped checkpoint (seed 0), and a tokenizer beside it unless `tokenizer` is False
    (the weights need only torch and transformers, so they can be written before loraforge is built:
    benchmarks/run_gpu.sh's callers start this in the background during the build)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(llama_config(shape, layers)).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    if tokenizer:
        write_tokenizer(folder)


def write_tokenizer(folder: Path) -> None:
    # Loaders want a tokenizer beside the weights; the step feeds random ids, so any will do.
    from loraforge.testing import build_tokenizer

    build_tokenizer().save_pretrained(folder)


@contextlib.contextmanager
def checkpoint_folder(checkpoint, layers: int | None, shape: str = "8b"):
    """The folder of the Llama-shaped checkpoint the variants load: `checkpoint` when given (written there
    on first use, so later runs skip the minutes of writing), else a scratch folder removed afterwards."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as scratch:
        folder = Path(checkpoint or scratch)
        if not (folder / "config.json").exists():
            write_checkpoint(folder, layers, shape)
        elif not (folder / "tokenizer_config.json").exists():
            write_tokenizer(folder)
        yield str(folder)


def bnb_4bit_model(folder: str):
    """The checkpoint as transformers + bitsandbytes users load it in 4-bit: NF4 with double quantization,
    bf16 compute, SDPA attention, on GPU 0 (the benchmarks' plain-stack baseline)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.bfloat16,
                                                device_map={"": 0}, attn_implementation="sdpa")  # fmt: skip


def load(impl: str, folder: str, seq: int):
    if impl == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(folder, max_seq_length=seq, load_in_4bit=True, dtype=torch.bfloat16)
        return FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=TARGETS,
                                                use_gradient_checkpointing="unsloth")  # fmt: skip
    if impl == "loraforge":
        from loraforge import FastLanguageModel

        # LORAFORGE_BENCH_DTYPE=float32: the same step in fp32 (a numerics reference for the bf16 rows' losses)
        dtype = getattr(torch, os.environ.get("LORAFORGE_BENCH_DTYPE", "bfloat16"))
        # LORAFORGE_STREAM_BASE_WEIGHTS=1: the NF4 bases streamed from host memory (the ~3 GiB they free can
        # then buy speed: LORAFORGE_KEEP_LAST_LAYERS=N keeps N layers out of the checkpoint, no recompute);
        # LORAFORGE_STREAM_LAYERS=N streams the first N decoder layers only
        stream = os.environ.get("LORAFORGE_STREAM_BASE_WEIGHTS", "0") == "1"
        if os.environ.get("LORAFORGE_STREAM_LAYERS"):
            stream = int(os.environ["LORAFORGE_STREAM_LAYERS"])
        # The input embedding table in pinned host memory (frees 0.98 GiB here): "auto" (the default) offloads
        # it here; LORAFORGE_OFFLOAD_EMBEDDING=0 keeps it on the GPU, =1 insists
        offload_embedding = {"0": False, "1": True}.get(os.environ.get("LORAFORGE_OFFLOAD_EMBEDDING", ""), "auto")
        model, _ = FastLanguageModel.from_pretrained(folder, max_seq_length=seq, load_in_4bit=True, dtype=dtype,
                                                     stream_base_weights=stream,
                                                     offload_embedding=offload_embedding)  # fmt: skip
        return FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=TARGETS,
                                                use_gradient_checkpointing="unsloth")  # fmt: skip
    if impl == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    from peft import LoraConfig, get_peft_model

    model = bnb_4bit_model(folder)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))


def _allocator_counts() -> dict:
    """The caching allocator's calls to the driver so far: segments it allocated (cudaMalloc) and freed
    (cudaFree, which synchronizes the device), and retries after a failed allocation (each frees cached
    blocks first). Differences over the timed steps say whether a change made the allocator go to the
    driver during the step, where it stalls the host."""
    stats = torch.cuda.memory_stats()
    counts = {"mallocs": stats.get("segment.all.allocated", 0), "frees": stats.get("segment.all.freed", 0),
              "retries": stats.get("num_alloc_retries", 0)}  # fmt: skip
    # The pinned host allocator's too (offloaded activations live there): a new pinned block is a
    # cudaHostAlloc, milliseconds for a layer-sized one. It grows when the blocks it has are still in use
    # by copies the device has not run yet, so how far the host runs ahead changes it.
    host = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
    counts["host_mallocs"] = host.get("num_host_alloc", 0)
    counts["host_alloc_ms"] = host.get("host_alloc_time.total", 0) / 1e3  # (reported in microseconds)
    return counts


class _CollectorWatch:
    """Python's cyclic garbage collections while it is on (gc.callbacks): per generation, how many and
    their total time. A full (generation 2) collection walks every tracked object, ~0.5 M of them with an
    8B model loaded, and would stall the host for tens of ms at a random step."""

    def __init__(self):
        self.counts, self.ms, self._start = [0, 0, 0], [0.0, 0.0, 0.0], 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.counts[info["generation"]] += 1
            self.ms[info["generation"]] += 1e3 * (time.perf_counter() - self._start)

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)

    def note(self) -> str:
        return ", ".join(f"gen{g} {n} ({ms:.1f} ms)" for g, (n, ms) in enumerate(zip(self.counts, self.ms)))


def _allocator_note(counts: dict | None) -> str:
    c = {"mallocs": "?", "frees": "?", "retries": "?", "host_mallocs": "?", "host_alloc_ms": 0.0, **(counts or {})}
    return (f"{c['mallocs']} segment allocations, {c['frees']} frees, {c['retries']} retries, "
            f"{c['host_mallocs']} pinned host blocks ({c['host_alloc_ms']:.1f} ms)")  # fmt: skip


def _step_spread(step_ms) -> str:
    """'; steps 320.1-325.7 ms' for the row's note (nothing when the steps were not timed one by one)."""
    return f"; steps {min(step_ms):.1f}-{max(step_ms):.1f} ms" if step_ms else ""


def _host_phases(phases) -> str:
    """'; host per step (median ms): forward 150.2, backward 120.3, optimizer 1.1, then waited 70.4' for the note:
    how long the host took to issue each part of a step, and how long it then waited for the GPU to finish."""
    if not phases:
        return ""
    medians = [sorted(column)[len(column) // 2] for column in zip(*phases)]
    return "; host per step (median ms): forward {:.1f}, backward {:.1f}, optimizer {:.1f}, then waited {:.1f}".format(*medians)


def _host_cpu() -> str:
    """The host CPU's model name (machines lent as the same GPU kind differ in it)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def pcie_gb_per_s(mib: int = 256, reps: int = 5) -> tuple[float, float]:
    """(device-to-host, host-to-device) GB/s of `mib` MiB copies between the GPU and pinned host memory, the
    best of `reps`, with nothing else running: what this host's PCIe and memory give the offloaded checkpoint
    (H100 machines lent as the same kind differ; copy_pacing's reading says what the copies got under load)."""
    device = torch.empty(mib << 20, dtype=torch.uint8, device="cuda")
    host = torch.empty(mib << 20, dtype=torch.uint8, pin_memory=True)
    rates = []
    for dst, src in ((host, device), (device, host)):
        best = float("inf")
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end))
        rates.append((mib << 20) / best / 1e6)
    del device
    torch.cuda.empty_cache()  # (the probe's segment must not stay cached for the step's allocations to reuse)
    return rates[0], rates[1]


def run_variant(impl: str, folder: str, batch: int, seq: int, steps: int, warmup: int, profile: bool = False,
                cprofile: bool = False) -> dict:
    if impl == "unsloth":
        import unsloth  # noqa: F401  (must come before transformers)
    pcie = pcie_gb_per_s()  # before the model: nothing else on the GPU yet
    torch.cuda.reset_peak_memory_stats()
    model = load(impl, folder, seq)
    load_peak = torch.cuda.max_memory_allocated() / 2**30
    if os.environ.get("LORAFORGE_GC_FREEZE") == "1":  # experiment: leave what loading made out of full collections
        gc.collect()
        gc.freeze()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=True)  # the Trainer's default, adamw_torch_fused
    gen = torch.Generator(device="cuda").manual_seed(1)
    input_ids = torch.randint(0, 128256, (batch, seq), device="cuda", generator=gen)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    losses, marks = [], []

    phases = []  # per step: host ms issuing the forward, the backward, the optimizer; then ms waiting for the GPU

    def step():
        t0 = time.perf_counter()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        losses.append(loss.item())  # (waits for the whole step: consecutive marks are one step apart)
        marks.append(time.perf_counter())
        phases.append((t1 - t0, t2 - t1, t3 - t2, marks[-1] - t3))

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warmup_peak = torch.cuda.max_memory_allocated() / 2**30  # the first steps included: what a run must fit
    torch.cuda.reset_peak_memory_stats()
    allocator_before = _allocator_counts()
    with _CollectorWatch() as collector:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    steady_peak = torch.cuda.max_memory_allocated() / 2**30
    allocator = {k: v - allocator_before[k] for k, v in _allocator_counts().items()}
    result = {"tokens_per_s": batch * seq * steps / elapsed, "peak_gib": max(warmup_peak, steady_peak),
              "steady_peak_gib": steady_peak, "allocator": allocator,
              "first_loss": losses[0], "last_loss": losses[-1], "trainable": sum(p.numel() for p in params),
              "load_peak_gib": load_peak, "losses": [round(x, 4) for x in losses], "gc": collector.note(),
              # Each timed step's period (from the previous step's loss to its own): an erratic host shows here.
              "step_ms": [round(1e3 * (b - a), 1) for a, b in zip(marks[warmup - 1 :], marks[warmup:])] if warmup else [],
              # Per timed step, host ms spent issuing the forward / backward / optimizer, then waiting for the
              # GPU to finish the step: a wait near 0 means the GPU waited for the host instead.
              "host_phases_ms": [[round(1e3 * t, 1) for t in p] for p in phases[warmup:]],
              "pcie_gb_per_s": [round(rate, 1) for rate in pcie]}  # fmt: skip
    if impl == "loraforge":  # whether the forward's copies to host kept up, and what that cost
        from loraforge.train import copy_pacing

        result["copy_pacing"] = copy_pacing.summary()
    if profile:  # after the timed steps, so it cannot disturb them
        from benchmarks.profile_train_step import profile_step

        result["profile"] = profile_step(step)
    if cprofile:  # where the host's time goes, per Python function, over 3 steps
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        profiler.disable()
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumtime").print_stats(60)
        result["cprofile"] = text.getvalue()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("8b", "1b"), default="8b", help="Llama-3.1-8B or Llama-3.2-1B shape")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's own)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    # Four: the caching allocators (device, and pinned host for the offloaded activations) still grew
    # during the timed steps after two (26 segments at 5b14231, H100).
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--profile", action="store_true", help="also profile one step per variant "
                        "(kernel groups, idle gaps: benchmarks/profile_train_step.py) into DIR/train_step_profile.json")
    parser.add_argument("--cprofile", action="store_true", help="also cProfile 3 steps per variant (host time per "
                        "Python function) into DIR/train_step_cprofile_<impl>.txt")  # fmt: skip
    parser.add_argument("--checkpoint", type=Path, default=None, help="keep the random checkpoint in this folder "
                        "(reused when it holds one already), e.g. for memory_at_peak.py --folder")  # fmt: skip
    parser.add_argument("--weights-only", action="store_true", help="only write the checkpoint's weights into "
                        "--checkpoint (no tokenizer, no loraforge import: can run while loraforge builds)")  # fmt: skip
    parser.add_argument("--variant", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.weights_only:
        if args.checkpoint is None:
            parser.error("--weights-only needs --checkpoint")
        if not (args.checkpoint / "config.json").exists():
            write_checkpoint(args.checkpoint, args.layers, args.shape, tokenizer=False)
        return
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.folder, args.batch, args.seq, args.steps, args.warmup,
                                     args.profile, args.cprofile)))
        return

    rate = matmul_tflops()
    config = llama_config(args.shape, args.layers)
    layers = config.num_hidden_layers
    # 6 FLOP per parameter and token; the 8B shape keeps the round 8.0e9 of the rows recorded before.
    params = 8.0e9 * layers / 32 if args.shape == "8b" else parameter_count(config)
    limit = rate * 1e12 / (6 * params)
    rows = []
    with checkpoint_folder(args.checkpoint, args.layers, args.shape) as folder:
        results = {}
        for impl in args.impls.split(","):
            cmd = [sys.executable, __file__, "--variant", impl, "--folder", folder, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
            cmd += ["--profile"] if args.profile else []
            cmd += ["--cprofile"] if args.cprofile else []
            result, stderr = harness.run_json_process(cmd, timeout=900)
            if result is None:
                print(f"{impl} failed:\n{stderr[-3000:]}")
                continue
            results[impl] = result
            print(impl, {k: v for k, v in results[impl].items() if k not in ("profile", "cprofile")}, flush=True)
    for impl, r in results.items():
        text = r.pop("cprofile", None)
        if text and args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"train_step_cprofile_{impl}.txt").write_text(text)
    if args.profile and args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        profiles = {impl: r.pop("profile", None) for impl, r in results.items()}
        (args.out / "train_step_profile.json").write_text(json.dumps(profiles, indent=1))
    ours = results.get("loraforge", {}).get("tokens_per_s")
    # Switches that change loraforge's path (LORAFORGE_LAYER_SPLIT=0, ...) go into the row, so that runs
    # made to attribute a change stay distinguishable in the CSV.
    settings = "".join(f"; {k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(("LORAFORGE_", "PYTORCH_CUDA_ALLOC_CONF"))
                       and k not in ("LORAFORGE_COMMIT", "LORAFORGE_BENCH", "LORAFORGE_GPU_TESTS", "LORAFORGE_TAIL",
                                     "LORAFORGE_GPU_TEST_FILES", "LORAFORGE_GPU_TEST_TIMEOUT", "LORAFORGE_PROFILE"))  # fmt: skip
    cpu = _host_cpu()
    for impl, r in results.items():
        rows.append({"benchmark": f"train_step_llama{args.shape}_{layers}l_b{args.batch}x{args.seq}", "case": "qlora r16 all",
                     "impl": impl, "median_us": 1e6 * args.batch * args.seq / r["tokens_per_s"],
                     "extra_peak_mib": r["peak_gib"] * 1024, "limit_us": 1e6 * args.batch * args.seq / limit,
                     "fraction_of_limit": r["tokens_per_s"] / limit,
                     "vs_ours": (ours / r["tokens_per_s"]) if ours else "",
                     "note": f"{r['tokens_per_s']:.0f} tok/s, peak {r['peak_gib']:.2f} GiB (total; after the "
                             f"warmup steps {r['steady_peak_gib']:.2f}; loading "
                             f"{r['load_peak_gib']:.2f}), loss "
                             f"{r['first_loss']:.3f}->{r['last_loss']:.3f}; us = per step; limit {limit:.0f} tok/s; "
                             f"fused AdamW; allocator over the timed steps: {_allocator_note(r.get('allocator'))}; "
                             f"garbage collections over them: {r.get('gc', '?')}; host {cpu}"
                             + _step_spread(r.get("step_ms")) + _host_phases(r.get("host_phases_ms"))
                             + (f"; {r['copy_pacing']}" if r.get("copy_pacing") else "")
                             + ("; PCIe before loading: {} GB/s to host, {} back".format(*r["pcie_gb_per_s"])
                                if r.get("pcie_gb_per_s") else "") + settings})  # fmt: skip
    harness.write_rows("train_step", rows, args.out)
    harness.print_table(rows)


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = harness.median(harness.time_cuda(lambda _: a @ b, rotations=1, warmup=5, repeat=20))
    return 2 * 8192**3 / (t * 1e-6) / 1e12


if __name__ == "__main__":
    main()
