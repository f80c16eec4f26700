"""Launch-parameter sweeps for the bandwidth-bound Triton kernels, forward and backward timed apart
(CUDA-graph replay), each against the bytes it must move at the copy rate measured in the same run.
Used to choose the defaults in triton_kernels/{rmsnorm,rope}.py; not a benchmark of record.

    python benchmarks/sweep_kernels.py [rmsnorm] [rope] [fused_ce] [ce_row] [--out DIR] [--budget-s S]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import harness  # noqa: E402

ROT = 3
DEVICE = "cuda"


def timed(fn) -> float:
    return harness.time_cuda_graph(fn, ROT)


# RMSNorm backward tiles (BLOCK_ROWS, warps, STAGES) at hidden 4096. ptxas for sm_90 (triton 3.6) gives a
# thread ~200 registers at 1 row x 4 warps, ~120 at 8 warps, 64 at 16 (two programs resident per SM), ~120
# at 2 rows x 16 warps and ~128 (a few bytes spilled) at 4 x 16 (one program); each stage past the first
# adds BLOCK_ROWS x 16 KB of shared memory, the next tiles' x and dy, loaded asynchronously.
RMS_BWD_TILES = (
    [(1, w, s) for w in (4, 8, 16) for s in (1, 2, 3, 4)]
    + [(1, 8, 6), (1, 16, 6)]
    + [(2, w, s) for w in (8, 16) for s in (1, 2, 3)]
    + [(2, 32, 2), (4, 16, 1), (4, 16, 2), (4, 32, 1), (4, 32, 2)]
)
RMS_PROGRAMS_PER_SM = (1, 2, 3)
RMS_ROWS = 8192
RMS_FWD_TILES = ((1, 2), (1, 4), (1, 8), (2, 4), (2, 8))  # (BLOCK_ROWS, warps)
RMS_BASELINE = {"rows": 1, "warps": 8, "stages": 2, "pps": 2}  # the defaults before this sweep


@contextlib.contextmanager
def overridden(module, **values):
    """Set module-level launch knobs for the duration of a block."""
    before = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(module, name, value)


def kernel_resources(compiled, props) -> dict:
    """Registers, spills, shared memory and the programs of this kernel that fit on one SM at once."""
    if compiled is None or getattr(compiled, "n_regs", None) is None:
        return {}
    warps, shared = compiled.metadata.num_warps, compiled.metadata.shared
    regs_per_warp = -(-compiled.n_regs * 32 // 256) * 256  # allocated per warp in units of 256
    fit = min(
        getattr(props, "regs_per_multiprocessor", 65536) // (regs_per_warp * warps),
        getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps),
        getattr(props, "shared_memory_per_multiprocessor", 233472) // (shared + 1024),  # 1 KB reserved a block
        32,
    )
    return {"regs": compiled.n_regs, "spills": compiled.n_spills, "smem_kb": round(shared / 1024, 1), "fit_per_sm": fit}


def print_table(title: str, rows: list[dict], columns: list[str], key: str) -> None:
    """Rows with a time under `key`, fastest first, as aligned columns."""
    timed_rows = sorted((r for r in rows if isinstance(r.get(key), float)), key=lambda r: r[key])
    print(f"\n== {title} (fastest first; frac = limit / time at the measured copy rate)")
    print("  ".join(f"{c:>9}" for c in columns))
    for r in timed_rows:
        print("  ".join(f"{r[c]:9.3f}" if isinstance(r.get(c), float) else f"{str(r.get(c, '')):>9}" for c in columns))
    for r in rows:
        if "error" in r:
            print("  failed:", {c: r[c] for c in columns[:4] if c in r}, r["error"])
    skipped = sum("skipped" in r for r in rows)
    if skipped:
        print(f"  {skipped} more not timed: the time budget was spent (--budget-s)")
    sys.stdout.flush()


def sweep_rmsnorm(bandwidth: float, budget_s: float = 150.0, save=lambda rows: None) -> list[dict]:
    """RMSNorm 8,192 x 4,096 bf16, Llama form. Backward tiles x programs per SM with the forward's saved
    rstd, for a full dy (x, dy read, dx written: 3 passes) and a broadcast one (2 passes); then for the
    best tiles: the recomputed rstd, the one-launch dw sum, a frozen weight (persistent grid or one
    program a tile); the forward's tiles; and forward + backward together, launchers and op, against
    the 4-pass limit (x, y, dy, dx: bench_rmsnorm.py and DESIGN.md's anchor) and the 5 passes a separate
    forward and backward must make (the backward reads x again). Stops timing new configurations
    after budget_s seconds, part 1 after 60% of it (compiling is most of the time); `save` gets the rows
    after each part."""
    from loraforge.ops import rmsnorm as op
    from loraforge.triton_kernels import rmsnorm as k

    rows, hidden, eps = RMS_ROWS, 4096, 1e-6
    started = time.perf_counter()
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    xs = [torch.randn(rows, hidden, device=DEVICE, dtype=torch.bfloat16) for _ in range(ROT)]
    w = 1 + 0.1 * torch.randn(hidden, device=DEVICE, dtype=torch.bfloat16)
    dys = [torch.randn_like(x) for x in xs]
    dy_bcast = torch.ones((), device=DEVICE, dtype=torch.bfloat16).expand(rows, hidden)
    rstds = [k.rms_norm_forward(x, w, eps, False, torch.bfloat16)[1] for x in xs]
    pass_us = rows * hidden * 2 / (bandwidth * 1e9) * 1e6  # one read or one write of x (bandwidth: read + write)
    out: list[dict] = []

    def run(config: dict, knobs: dict, timings: dict, resources_of: str | None = "backward", share=1.0) -> dict:
        """Time each of timings {name: (fn(i), passes)} under knobs; note what went wrong instead. Nothing
        new is timed once `share` of the time budget is spent."""
        row = dict(config)
        if time.perf_counter() - started > share * budget_s:
            row["skipped"] = f"time budget ({share * budget_s:.0f} s) spent"
        else:
            try:
                with overridden(k, **knobs):
                    for i, (name, (fn, passes)) in enumerate(timings.items()):
                        t = timed(fn)
                        row[f"us_{name}"], row[f"frac_{name}"] = t, passes * pass_us / t
                        if i == 0 and resources_of:
                            row.update(kernel_resources(k.last_compiled.get(resources_of), props))
            except Exception as error:  # noqa: BLE001  (out of resources for a config: note it, go on)
                row["error"] = f"{type(error).__name__}: {error}"[:160]
        out.append(row)
        return row

    def bwd(i, dy, rstd=True, weight_grad=True):
        return k.rms_norm_backward(dy, xs[i], w, rstds[i] if rstd else None, False, weight_grad, eps=eps)

    def of(part: str) -> list[dict]:
        return [r for r in out if r["part"] == part]

    def best(part: str, key: str = "us_full", n: int = 1) -> list[dict]:
        return sorted((r for r in of(part) if isinstance(r.get(key), float)), key=lambda r: r[key])[:n]

    def bwd_knobs(r: dict) -> dict:
        return {"BWD_BLOCK_ROWS": r["rows"], "BWD_NUM_WARPS": r["warps"], "BWD_STAGES": r["stages"],
                "BWD_PROGRAMS_PER_SM": r["pps"]}  # fmt: skip

    tile_cols = ["rows", "warps", "stages", "pps"]
    res_cols = ["regs", "spills", "smem_kb", "fit_per_sm"]

    # 1. Backward tiles x programs per SM, saved rstd, trainable weight.
    for (tile_rows, warps, stages), pps in itertools.product(RMS_BWD_TILES, RMS_PROGRAMS_PER_SM):
        config = {"part": "bwd", "rows": tile_rows, "warps": warps, "stages": stages, "pps": pps}
        timings = {"full": (lambda i: bwd(i, dys[i]), 3), "bcast": (lambda i: bwd(i, dy_bcast), 2)}
        run(config, bwd_knobs(config), timings, share=0.6)  # the rest of the budget for the parts below
    print_table("backward, saved rstd, trainable weight", of("bwd"),
                tile_cols + ["us_full", "frac_full", "us_bcast", "frac_bcast"] + res_cols, "us_full")  # fmt: skip
    save(out)

    # 2. The recomputed rstd (the kernel before this change) on the best tiles and the old defaults.
    seen = set()
    for r in best("bwd", n=5) + [RMS_BASELINE]:
        config = {"part": "bwd_recompute", **{c: r[c] for c in tile_cols}}
        if tuple(config.values()) in seen:
            continue
        seen.add(tuple(config.values()))
        timings = {"full": (lambda i: bwd(i, dys[i], rstd=False), 3),
                   "bcast": (lambda i: bwd(i, dy_bcast, rstd=False), 2)}  # fmt: skip
        run(config, bwd_knobs(config), timings)
    print_table("backward, rstd recomputed (no saved statistic)", of("bwd_recompute"),
                tile_cols + ["us_full", "frac_full", "us_bcast", "frac_bcast"] + res_cols, "us_full")  # fmt: skip

    # 3. The final dw sum in one Triton launch instead of torch's sum and cast.
    for r in best("bwd", n=3):
        config = {"part": "bwd_dw_triton", **{c: r[c] for c in tile_cols}}
        run(config, {**bwd_knobs(r), "BWD_DW_REDUCE": "triton"}, {"full": (lambda i: bwd(i, dys[i]), 3)})
    print_table("backward, saved rstd, dw summed in one Triton launch", of("bwd_dw_triton"),
                tile_cols + ["us_full", "frac_full"], "us_full")  # fmt: skip
    save(out)

    # 4. Frozen weight (LoRA): no dw, so the grid need not be persistent.
    frozen_tiles = {(r["rows"], r["warps"], r["stages"]): r["pps"] for r in best("bwd", n=3)}
    for tile in ((1, 4, 1), (1, 8, 1), (2, 8, 1)):
        frozen_tiles.setdefault(tile, 2)
    one_tile_done = set()
    for (tile_rows, warps, stages), pps in frozen_tiles.items():
        for persistent in (True, False):
            if not persistent:  # one tile a program runs unpipelined whatever BWD_STAGES says
                if (tile_rows, warps) in one_tile_done:
                    continue
                one_tile_done.add((tile_rows, warps))
                stages = 1
            config = {"part": "bwd_frozen", "rows": tile_rows, "warps": warps, "stages": stages,
                      "pps": pps if persistent else "all"}  # fmt: skip
            knobs = {**bwd_knobs({**config, "pps": pps}), "BWD_FROZEN_PERSISTENT": persistent}
            run(config, knobs, {"full": (lambda i: bwd(i, dys[i], weight_grad=False), 3)})
    print_table("backward, frozen weight (no dw); pps 'all': one program a tile", of("bwd_frozen"),
                tile_cols + ["us_full", "frac_full"] + res_cols, "us_full")  # fmt: skip

    # 5. Forward tiles (it also writes rstd now: 4 bytes a row).
    for tile_rows, warps in RMS_FWD_TILES:
        config = {"part": "fwd", "rows": tile_rows, "warps": warps}
        fwd = (lambda i: k.rms_norm_forward(xs[i], w, eps, False, torch.bfloat16), 2)
        run(config, {"FWD_BLOCK_ROWS": tile_rows, "FWD_NUM_WARPS": warps}, {"fwd": fwd}, resources_of="forward")
    print_table("forward", of("fwd"), ["rows", "warps", "us_fwd", "frac_fwd"] + res_cols, "us_fwd")
    save(out)

    # 6. Forward + backward with the winners, against the 4-pass limit and the 5 passes they must make.
    best_fwd, best_bwd = best("fwd", "us_fwd"), best("bwd") + best("bwd_dw_triton")
    if best_fwd and best_bwd:
        f, b = best_fwd[0], min(best_bwd, key=lambda r: r["us_full"])
        knobs = {**bwd_knobs(b), "FWD_BLOCK_ROWS": f["rows"], "FWD_NUM_WARPS": f["warps"],
                 "BWD_DW_REDUCE": "triton" if b["part"] == "bwd_dw_triton" else "torch"}  # fmt: skip
        frozen = best("bwd_frozen")
        if frozen:
            knobs["BWD_FROZEN_PERSISTENT"] = frozen[0]["pps"] != "all"
        xg = [x.clone().requires_grad_() for x in xs]
        wg, w_frozen = w.clone().requires_grad_(), w.clone()

        def launchers(i):
            y, rstd = k.rms_norm_forward(xs[i], w, eps, False, torch.bfloat16)
            return k.rms_norm_backward(dys[i], xs[i], w, rstd, False, True)

        def through_op(i, weight):
            y = op.rms_norm(xg[i], weight, eps)
            return torch.autograd.grad(y, (xg[i], weight) if weight.requires_grad else (xg[i],), dys[i])

        config = {"part": "fwd_bwd", "fwd": f"{f['rows']}x{f['warps']}w",
                  "bwd": f"{b['rows']}x{b['warps']}w/s{b['stages']}/pps{b['pps']}", "knobs": knobs}  # fmt: skip
        row = run(config, knobs, {"launchers": (launchers, 4), "op": (lambda i: through_op(i, wg), 4),
                                  "op_frozen": (lambda i: through_op(i, w_frozen), 4)}, resources_of=None)  # fmt: skip
        print("\n== forward + backward (full dy), best tiles:", json.dumps(knobs))
        for name in ("launchers", "op", "op_frozen"):
            if f"us_{name}" in row:
                t = row[f"us_{name}"]
                print(f"  {name:10s} {t:8.1f} us   {4 * pass_us / t:6.1%} of the 4-pass limit ({4 * pass_us:.1f} us)"
                      f"   {5 * pass_us / t:6.1%} of the 5-pass one ({5 * pass_us:.1f} us)")  # fmt: skip
        print("  separately: forward", f"{f['us_fwd']:.1f} us, backward {b['us_full']:.1f} us")
        print("  as defaults, in triton_kernels/rmsnorm.py (the forward's rule gives 1 row x 8 warps at 4096):")
        print(f"    BWD_WIDE_TILES = {{4096: ({b['rows']}, {b['warps']})}}\n    BWD_STAGES = {b['stages']}\n"
              f"    BWD_PROGRAMS_PER_SM = {b['pps']}\n    BWD_DW_REDUCE = {knobs['BWD_DW_REDUCE']!r}")  # fmt: skip
        if frozen:
            print(f"    BWD_FROZEN_PERSISTENT = {knobs['BWD_FROZEN_PERSISTENT']}   (frozen's own best tile:"
                  f" {frozen[0]['rows']} x {frozen[0]['warps']} warps, stages {frozen[0]['stages']})")  # fmt: skip
    print(f"rmsnorm sweep: {time.perf_counter() - started:.0f} s")
    save(out)
    return out


def sweep_rope(bandwidth: float) -> list[dict]:
    from loraforge.triton_kernels import rope as k

    b, s, hq, hk, d = 4, 4096, 32, 8, 128
    qs = [torch.randn(b, s, hq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(ROT)]
    ks = [torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(ROT)]
    cos = torch.randn(1, s, d, device="cuda", dtype=torch.bfloat16)
    sin = torch.randn(1, s, d, device="cuda", dtype=torch.bfloat16)
    q_out = [torch.empty_like(q) for q in qs]
    k_out = [torch.empty_like(x) for x in ks]
    grads_q = [torch.randn_like(q) for q in qs]
    grads_k = [torch.randn_like(x) for x in ks]
    pass_us = b * s * (hq + hk) * d * 2 / (bandwidth * 1e9) * 1e6
    out = []
    for warps in (1, 2, 4, 8):
        k.NUM_WARPS = warps
        t = timed(lambda i: k.rope_forward(qs[i], ks[i], cos, sin, q_out[i], k_out[i]))
        out.append({"kernel": "rope_fwd", "warps": warps, "us": t, "fraction": 2 * pass_us / t})
        t = timed(lambda i: k.rope_backward(grads_q[i], grads_k[i], cos, sin, q_out[i], k_out[i]))
        out.append({"kernel": "rope_bwd", "warps": warps, "us": t, "fraction": 2 * pass_us / t})
    k.NUM_WARPS = 0
    return out


def sweep_ce_row(bandwidth: float) -> list[dict]:
    """The fused CE's row kernel (loss, then the gradient over the logits) on one default chunk,
    1,024 x 128,256 bf16 logits, by BLOCK and warps: it must read the chunk twice and write it once."""
    from loraforge.triton_kernels import fused_linear_cross_entropy as kernels

    rows, vocab = 1024, 128256
    chunks = [torch.randn(rows, vocab, device=DEVICE, dtype=torch.bfloat16) for _ in range(ROT)]
    targets = torch.randint(0, vocab, (rows,), device=DEVICE)
    loss, coef = torch.empty(rows, device=DEVICE), torch.ones((), device=DEVICE)
    limit_us = 3 * rows * vocab * 2 / (bandwidth * 1e9) * 1e6
    out = []
    for block, warps in itertools.product((2048, 4096, 8192, 16384), (4, 8, 16, 32)):
        if block // (32 * warps) < 4 or block // (32 * warps) > 64:  # values a thread holds
            continue

        def call(i, block=block, warps=warps):
            kernels.cross_entropy_loss_and_grad_(chunks[i], targets, coef, loss, ignore_index=-100, logit_scale=1.0,
                                                 softcap=0.0, block=block, warps=warps)  # fmt: skip

        us = timed(call)
        out.append({"kernel": "ce_row", "block": block, "warps": warps, "us": us, "fraction": limit_us / us})
    return out


def profile_fused_ce(bandwidth: float) -> list[dict]:
    """Peak extra memory and kernel time by kernel of one forward + backward of the fused linear CE
    (8,192 x 4,096 x 128,256 bf16, trainable head), for a few chunk sizes."""
    from torch.profiler import ProfilerActivity, profile

    from loraforge.ops.fused_linear_cross_entropy import fused_linear_cross_entropy

    n, h, v = 8192, 4096, 128256
    x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(v, h, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda")
    out = []
    for chunk in (1024, 2048):

        def step():
            x.grad = w.grad = None
            fused_linear_cross_entropy(x, w, t, chunk_rows=chunk).backward()

        step()
        x.grad = w.grad = None
        torch.cuda.empty_cache()
        peak = harness.extra_peak_mib(step)
        x.grad = w.grad = None
        ms = (
            harness.median(harness.time_cuda(lambda _: step(), 1, warmup=2, repeat=10))
            / 1e3
        )
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernels = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kernels[e.name[:90]] = (
                    kernels.get(e.name[:90], 0.0) + e.device_time / 1e3
                )
        top = sorted(kernels.items(), key=lambda kv: -kv[1])[:8]
        out.append({"kernel": "fused_ce", "chunk": chunk, "ms": ms, "peak_gib": peak / 1024, "fraction": 0,
                    "kernel_ms": [(name, round(t_ms, 3)) for name, t_ms in top]})  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("which", nargs="*", default=["rmsnorm", "rope", "fused_ce"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--budget-s", type=float, default=150.0,
                        help="rmsnorm: stop timing new configurations after this many seconds")  # fmt: skip
    args = parser.parse_args()
    bandwidth = harness.copy_bandwidth_gbs()
    print(f"copy bandwidth {bandwidth:.0f} GB/s")
    results = {"copy_bandwidth_gbs": bandwidth, "gpu": harness.gpu_name(), "commit": harness.commit()}

    def save(name, rows):
        results[name] = rows
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "sweep_kernels.json").write_text(json.dumps(results, indent=1, default=str))

    for name in args.which:
        if name == "rmsnorm":  # prints its own tables
            save(name, sweep_rmsnorm(bandwidth, args.budget_s, lambda rows: save("rmsnorm", rows)))
            continue
        save(name, {"rope": sweep_rope, "fused_ce": profile_fused_ce, "ce_row": sweep_ce_row}[name](bandwidth))
        for row in sorted(results[name], key=lambda r: -r.get("fraction", r.get("fraction_bcast", 0))):
            print(json.dumps({key: round(v, 3) if isinstance(v, float) else v for key, v in row.items()}))


if __name__ == "__main__":
    main()
