"""GGUF export to Q4_K_M of a Llama-3.1-8B-shaped model (random bf16 weights): loraforge's packing on
the GPU and on the CPU, the whole save_pretrained_gguf, and llama.cpp's own quantize of our BF16 file,
whose output must be byte-identical to ours.

    python benchmarks/bench_gguf_export.py [--layers 32] [--out DIR] [--skip-cpu] [--threads N]
    python benchmarks/bench_gguf_export.py --cpu-only --layers 1 --hidden 256 --intermediate 512 \\
        --heads 4 --kv-heads 2 --vocab 1024            # a smoke test without a GPU

What is timed (wall clock, each tensor synchronised; the Q4_K_M mix: Q4_K for most tensors, Q6_K for
the output projection and half the attn_v / ffn_down layers, F32 norms):
  gpu-pack      gguf.quantize of every tensor on the GPU, from the float32 values the exporter packs
                (made beforehand, not timed); includes quantize's finiteness check. Median of --repeat.
  cpu-pack      the same with _core's C++ packer on --threads CPU threads (float32 host copies made
                beforehand, not timed); its bytes are checked against gpu-pack's.
  export        save_pretrained_gguf(model, dir, tokenizer, "q4_k_m") end to end: fp32 conversion of each
                weight, packing (GPU unless --cpu-only), copies to the host, tokenizer metadata, file writes.
  llama.cpp     llama_model_quantize (llama-cpp-python) turning our BF16 GGUF into Q4_K_M, no imatrix,
                nthread = --threads. Every tensor of its file must equal ours, byte for byte.
llama.cpp comes from the `llama_cpp` package (llama-cpp-python); --llama-cpp-dir puts a folder holding
it (and diskcache) first on sys.path, e.g. a copy of a site-packages where it is installed.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for `benchmarks.harness`

Q4_K_M_FTYPE = 15  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (ours and llama.cpp's)")
    parser.add_argument("--repeat", type=int, default=3, help="gpu-pack repetitions (median)")
    parser.add_argument("--cpu-only", action="store_true", help="no GPU: cpu-pack, a CPU-packed export, llama.cpp")
    parser.add_argument("--skip-cpu", action="store_true", help="skip cpu-pack (minutes at the 8B shape)")
    parser.add_argument("--skip-llama-cpp", action="store_true", help="skip llama.cpp's quantize and the check")
    parser.add_argument("--llama-cpp-dir", type=Path, default=None, help="folder to import llama_cpp from")
    parser.add_argument("--workdir", type=Path, default=None, help="where the GGUF files go (removed at the end)")
    parser.add_argument("--out", type=Path, default=None, help="also write the CSV here")
    return parser.parse_args()


def build_model(args, device: str):
    from loraforge import testing
    from transformers import AutoModelForCausalLM

    config = testing.tiny_config("llama", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                                 num_heads=args.heads, num_kv_heads=args.kv_heads,
                                 intermediate_size=args.intermediate, max_position_embeddings=8192)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval(), testing.build_tokenizer(512)


def q4_k_m_plan(model):
    """The exporter's tensors (name, shape, float32 values) and the Q4_K_M type of each."""
    from loraforge.export.gguf_convert import plan_gguf_tensors
    from loraforge.export.gguf_mixes import MIXES, ModelShape, plan_tensor_types

    tensors = plan_gguf_tensors(model)
    cfg = model.config
    shape = ModelShape("llama", cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads)
    return tensors, plan_tensor_types(MIXES["q4_k_m"], {t.name: t.shape for t in tensors}, shape)


def digest(data: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(data).data).hexdigest()


def pack_all(tensors, types, device: str, threads: int, hashes: bool = True) -> tuple[float, dict[str, str]]:
    """Seconds spent packing every quantized tensor (the rest are F32 norms, not packed), and the
    sha256 of each tensor's bytes (when `hashes`)."""
    from loraforge import gguf as lf_gguf

    total, digests = 0.0, {}
    for tensor in tensors:
        type_name = types[tensor.name]
        if not lf_gguf.TYPES[type_name].packed:
            continue
        values = tensor.values()
        values = values.reshape(-1, values.shape[-1])
        if device == "cpu":
            values = values.to("cpu").numpy()
        else:
            torch.cuda.synchronize()
        start = time.perf_counter()
        packed = lf_gguf.quantize(values, type_name, num_threads=threads)
        if device != "cpu":
            torch.cuda.synchronize()
        total += time.perf_counter() - start
        if hashes:
            digests[tensor.name] = digest(packed.cpu().numpy() if isinstance(packed, torch.Tensor) else packed)
        del values, packed
    return total, digests


def file_tensors(path) -> dict[str, tuple[str, np.ndarray]]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, t.data) for t in reader.tensors}


def compare_files(ours, theirs) -> str:
    """'' when every tensor has the same type and bytes, else what differs first."""
    a, b = file_tensors(ours), file_tensors(theirs)
    if sorted(a) != sorted(b):
        return f"tensor names differ: {sorted(set(a) ^ set(b))[:5]}"
    for name in a:
        if a[name][0] != b[name][0]:
            return f"{name}: type {a[name][0]} vs {b[name][0]}"
        if not np.array_equal(a[name][1].view(np.uint8), b[name][1].view(np.uint8)):
            return f"{name}: bytes differ"
    return ""


def llama_cpp_quantize(args, source: Path, target: Path) -> float:
    if args.llama_cpp_dir is not None:
        sys.path.insert(0, str(args.llama_cpp_dir))
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = Q4_K_M_FTYPE
    params.nthread = args.threads
    start = time.perf_counter()
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    elapsed = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"llama_model_quantize failed with status {status}")
    return elapsed


def main() -> None:
    args = parse_args()
    from loraforge.export import save_pretrained_gguf

    from benchmarks import harness

    gpu = not args.cpu_only
    if gpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-only for the CPU parts")
    model, tokenizer = build_model(args, "cuda" if gpu else "cpu")
    tensors, types = q4_k_m_plan(model)
    n_values = sum(int(np.prod(t.shape)) for t in tensors)
    case = (f"llama L={args.layers} H={args.hidden} I={args.intermediate} heads={args.heads}/{args.kv_heads} "
            f"V={args.vocab} ({n_values / 1e6:.1f}M values)")  # fmt: skip
    print(case)
    workdir = Path(tempfile.mkdtemp(prefix="bench_gguf_", dir=args.workdir))
    times, notes, digests = {}, {}, {}
    try:
        if gpu:
            pack_all(tensors[:3], types, "cuda", args.threads, hashes=False)  # warm-up: module load, allocator
            runs = [pack_all(tensors, types, "cuda", args.threads, hashes=i == 0) for i in range(max(1, args.repeat))]
            times["gpu-pack"] = statistics.median(t for t, _ in runs)
            digests = runs[0][1]
            notes["gpu-pack"] = f"{torch.cuda.get_device_name()}; median of {len(runs)}: " + ", ".join(
                f"{t:.2f}s" for t, _ in runs
            )
            print(f"gpu-pack: {times['gpu-pack']:.3f} s")
        if not args.skip_cpu:
            times["cpu-pack"], cpu_digests = pack_all(tensors, types, "cpu", args.threads)
            same = "" if not digests else f"; bytes == gpu-pack: {cpu_digests == digests}"
            notes["cpu-pack"] = f"_core C++, {args.threads} threads{same}"
            digests = digests or cpu_digests
            print(f"cpu-pack: {times['cpu-pack']:.3f} s ({args.threads} threads){same}")

        pack_device = "cuda" if gpu else "cpu"
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        (ours,) = save_pretrained_gguf(model, workdir / "ours", tokenizer, "q4_k_m", write_modelfile=False,
                                       model_name="bench", pack_device=pack_device)  # fmt: skip
        times["export"] = time.perf_counter() - start
        matches = {name: digest(data) for name, (_, data) in file_tensors(ours).items() if name in digests}
        notes["export"] = (f"save_pretrained_gguf q4_k_m, packed on {pack_device}, {Path(ours).stat().st_size / 2**30:.2f}"
                           f" GiB; tensors == pack: {matches == digests}")  # fmt: skip
        print(f"export: {times['export']:.3f} s ({notes['export']})")

        if not args.skip_llama_cpp:
            start = time.perf_counter()
            (bf16,) = save_pretrained_gguf(model, workdir / "bf16", tokenizer, "bf16", write_modelfile=False,
                                           model_name="bench", pack_device=pack_device)  # fmt: skip
            print(f"bf16 source for llama.cpp written in {time.perf_counter() - start:.1f} s")
            theirs = workdir / "llama-quantize.Q4_K_M.gguf"
            times["llama.cpp"] = llama_cpp_quantize(args, Path(bf16), theirs)
            difference = compare_files(ours, theirs)
            notes["llama.cpp"] = (f"llama_model_quantize BF16 -> Q4_K_M, nthread={args.threads}; "
                                  f"identical to ours: {difference or 'yes'}")  # fmt: skip
            print(f"llama.cpp: {times['llama.cpp']:.3f} s; identical to ours: {difference or 'yes'}")
            if difference:
                print("MISMATCH between our Q4_K_M file and llama.cpp's:", difference)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    reference = {"gpu-pack": "gpu-pack", "cpu-pack": "gpu-pack", "export": "export", "llama.cpp": "export"}
    rows = []
    for impl, seconds in times.items():
        base = times.get(reference[impl])
        rows.append({"benchmark": "gguf_export_q4_k_m", "case": case, "impl": impl, "median_us": seconds * 1e6,
                     "extra_peak_mib": "", "limit_us": "", "fraction_of_limit": "",
                     "vs_ours": seconds / base if base else "", "note": notes.get(impl, "")})  # fmt: skip
    path = harness.write_rows("gguf_export", rows, args.out)
    harness.print_table(rows)
    if "gpu-pack" in times and "cpu-pack" in times:
        print(f"cpu-pack / gpu-pack = {times['cpu-pack'] / times['gpu-pack']:.1f}x")
    if "llama.cpp" in times:
        print(f"llama.cpp quantize / our export = {times['llama.cpp'] / times['export']:.2f}x")
    print("written to", path)


if __name__ == "__main__":
    main()
