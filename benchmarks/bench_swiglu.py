"""SwiGLU (and GeGLU) at 8,192 x 14,336 bf16 (Llama-3-8B's MLP width), forward + backward with a real
incoming gradient (what down_proj's backward hands over): loraforge beside plain torch (transformers'
`act_fn(gate) * up`) and Liger-Kernel's LigerSiLUMulFunction / LigerGELUMulFunction, against the
copy-bandwidth limit measured in the same run.

Bytes that must move, forward and backward together: gate and up read, h written, the gradient of h
read, those of gate and up written: 6 x rows x cols x 2 bytes.

    python benchmarks/bench_swiglu.py [--out DIR] [--rows N] [--cols C]
    python benchmarks/bench_swiglu.py --check      # no GPU needed: each implementation once, small, vs float64

Two timings per implementation: `kernel` replays a CUDA graph of the calls (device time alone, the
number to hold against the copy limit), `eager` times each call from Python as a training step makes
it; and the peak memory above the inputs. `loraforge, reuse inputs` writes the gradients over gate and
up (as Liger always does): the difference in peak memory is that saving. gate and up reach each
implementation as views of leaf tensors, intermediates of the graph as in an MLP; where they are
overwritten they drift from call to call, which the timing of this memory-bound op does not notice.
Liger is optional (the anchors' .devkit/anchors on PYTHONPATH): where it does not import, its rows say why.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import harness  # noqa: E402

ROTATIONS = 3  # input sets cycled so that repeated calls do not find them in L2
DEVICE = "cuda"
MIB = 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="also write the CSV here")
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cols", type=int, default=14336)
    parser.add_argument("--check", action="store_true", help="run each implementation once on small inputs "
                        "(CPU when there is no GPU) and compare with float64; no timing")  # fmt: skip
    return parser.parse_args()


def implementations() -> tuple[dict[str, dict[str, Callable]], dict[str, str]]:
    """activation -> {name -> glu(gate, up) -> h}; and name -> why it is unavailable."""
    from loraforge.ops import swiglu

    impls = {
        "silu": {
            "loraforge": lambda g, u: swiglu.swiglu(g, u),
            "loraforge, reuse inputs": lambda g, u: swiglu.swiglu(g, u, reuse_inputs_in_backward=True),
            "torch": lambda g, u: F.silu(g) * u,
        },
        "gelu_tanh": {
            "loraforge": lambda g, u: swiglu.geglu(g, u, "tanh"),
            "loraforge, reuse inputs": lambda g, u: swiglu.geglu(g, u, "tanh", reuse_inputs_in_backward=True),
            "torch": lambda g, u: F.gelu(g, approximate="tanh") * u,
        },
    }
    missing = {}
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        impls["silu"]["liger"] = LigerSiLUMulFunction.apply
    except Exception as error:  # noqa: BLE001  (ImportError, or an incompatible triton)
        missing["silu/liger"] = f"unavailable: {type(error).__name__}: {error}"[:300]
    try:
        from liger_kernel.ops.geglu import LigerGELUMulFunction  # its GeLU is the tanh approximation

        impls["gelu_tanh"]["liger"] = LigerGELUMulFunction.apply
    except Exception as error:  # noqa: BLE001
        missing["gelu_tanh/liger"] = f"unavailable: {type(error).__name__}: {error}"[:300]
    return impls, missing


def make_inputs(rows, cols, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    gate, up, grad_h = (torch.randn(rows, cols, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(3))
    return gate.requires_grad_(), up.requires_grad_(), grad_h


def forward_backward(glu, gate_leaf, up_leaf, grad_h):
    # Views: intermediates of the graph (as gate_proj's output is), at no cost, so in-place backwards apply.
    gate, up = gate_leaf.view(gate_leaf.shape), up_leaf.view(up_leaf.shape)
    h = glu(gate, up)
    return h, torch.autograd.grad(h, (gate_leaf, up_leaf), grad_h)


def exact(activation, gate_leaf, up_leaf, grad_h):
    g64, u64 = (t.detach().double().requires_grad_() for t in (gate_leaf, up_leaf))
    act = F.silu if activation == "silu" else (lambda t: F.gelu(t, approximate="tanh"))
    return forward_backward(lambda g, u: act(g) * u, g64, u64, grad_h.double())


def errors_vs_exact(glu, inputs, exact_results) -> str:
    gate, up, grad_h = inputs
    fresh = [t.detach().clone().requires_grad_() for t in (gate, up)]  # some write over their inputs
    h, grads = forward_backward(glu, *fresh, grad_h)
    h64, grads64 = exact_results
    pairs = zip(("h", "d_gate", "d_up"), (h, *grads), (h64, *grads64))
    return "max err vs fp64: " + ", ".join(f"{n} {(a.double() - b).abs().max().item():.3g}" for n, a, b in pairs)


def check(impls, missing) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = make_inputs(7, 320, device)
    for activation, by_name in impls.items():
        exact_results = exact(activation, *inputs)
        for name, glu in by_name.items():
            print(f"{activation:9s} {name:24s} {errors_vs_exact(glu, inputs, exact_results)}")
    for name, why in missing.items():
        print(f"{name:34s} {why}")


def main() -> None:
    args = parse_args()
    impls, missing = implementations()
    if args.check:
        check(impls, missing)
        return

    bandwidth = harness.copy_bandwidth_gbs()
    print(f"copy bandwidth (read + write): {bandwidth:.0f} GB/s")
    case = f"{args.rows}x{args.cols}"
    tensor_bytes = args.rows * args.cols * 2
    must_move = 6 * tensor_bytes
    limit_us = must_move / (bandwidth * 1e9) * 1e6

    inputs = [make_inputs(args.rows, args.cols, DEVICE, seed) for seed in range(ROTATIONS)]
    pristine = make_inputs(args.rows, args.cols, DEVICE, seed=ROTATIONS)  # for errors: timed inputs drift
    rows = []
    for activation, by_name in impls.items():
        benchmark = f"{'swiglu' if activation == 'silu' else 'geglu_tanh'}_fwd_bwd_bf16"
        timings, notes = {}, {}
        exact_results = exact(activation, *pristine)
        for name, glu in by_name.items():
            try:
                notes[name] = errors_vs_exact(glu, pristine, exact_results)
                timings[name] = harness.measure(lambda i, glu=glu: forward_backward(glu, *inputs[i]), ROTATIONS)
            except Exception as error:  # noqa: BLE001  (one failing baseline must not lose the others' numbers)
                notes[name] = f"failed: {type(error).__name__}: {error}"[:300]
        unavailable = {k.split("/")[1]: v for k, v in missing.items() if k.startswith(activation + "/")}
        for mode in ("kernel", "eager"):
            ours = timings["loraforge"][mode]
            for name in list(timings) + list(unavailable):
                t = timings.get(name)
                rows.append({
                    "benchmark": f"{benchmark}_{mode}", "case": case, "impl": name,
                    "median_us": t[mode] if t else "", "extra_peak_mib": t["peak"] if t else "",
                    "limit_us": limit_us, "fraction_of_limit": limit_us / t[mode] if t else "",
                    "vs_ours": t[mode] / ours if t else "", "note": notes.get(name, unavailable.get(name, "")),
                })  # fmt: skip
        for name, note in notes.items():
            if name not in timings:
                rows.append({"benchmark": benchmark, "case": case, "impl": name, "note": note})
        del exact_results
        torch.cuda.empty_cache()
        rows.append({"benchmark": benchmark, "case": case, "impl": "copy-limit", "median_us": limit_us,
                     "limit_us": limit_us, "fraction_of_limit": 1.0,
                     "note": f"{must_move / 1e9:.3f} GB (gate, up, h, dh, d_gate, d_up) at {bandwidth:.0f} GB/s; "
                             f"one tensor is {tensor_bytes / MIB:.0f} MiB"})  # fmt: skip
    path = harness.write_rows("swiglu", rows, args.out)
    harness.print_table(rows)
    print("written to", path)


if __name__ == "__main__":
    main()
