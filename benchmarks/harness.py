"""Shared benchmark harness: timing with CUDA events, the copy-bandwidth ceiling measured in the
same run, peak extra memory, and result rows written to benchmarks/results/*.csv with the GPU,
the commit and the date.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import statistics
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FIELDS = ["date", "commit", "gpu", "benchmark", "case", "impl", "median_us", "extra_peak_mib",
          "limit_us", "fraction_of_limit", "vs_ours", "note"]  # fmt: skip


def commit() -> str:
    env_commit = os.environ.get("LORAFORGE_COMMIT")
    if env_commit:
        return env_commit
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def time_cuda(fn: Callable[[int], object], rotations: int, warmup: int = 10, repeat: int = 100) -> list[float]:
    """Microseconds per call of fn(i), i cycling over `rotations` input sets so that repeated calls
    do not read a warm L2 cache. Each call timed on its own with CUDA events; returns all times."""
    for i in range(warmup):
        fn(i % rotations)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    for i in range(repeat):
        starts[i].record()
        fn(i % rotations)
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]


def time_cuda_graph(fn: Callable[[int], object], rotations: int, calls: int = 12, replays: int = 30) -> float:
    """Device microseconds per call of fn(i): `calls` calls captured in one CUDA graph, the graph
    replayed `replays` times, median replay time / calls. This measures the kernels alone, without
    Python and launch overhead (which `time_cuda` includes when it exceeds the kernel time)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            fn(i % rotations)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % rotations)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    torch.cuda.empty_cache()
    return median(times)


def measure(call: Callable[[int], object], rotations: int) -> dict:
    """The three numbers every kernel benchmark reports for call(i): device time from graph replay
    ("kernel", nan when the call cannot be captured), per-call eager time ("eager"), and peak extra
    memory of one call in MiB ("peak")."""
    eager = median(time_cuda(call, rotations))
    try:
        kernel = time_cuda_graph(call, rotations)
    except RuntimeError as error:  # not capturable: eager only
        print("graph capture failed:", str(error)[:200])
        kernel = float("nan")
    return {"kernel": kernel, "eager": eager, "peak": extra_peak_mib(lambda: call(0))}


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def copy_bandwidth_gbs(nbytes: int = 2 << 30, repeat: int = 30) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written (GB/s)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    src.random_(0, 255)
    dst = torch.empty_like(src)
    times = time_cuda(lambda _: dst.copy_(src), rotations=1, warmup=5, repeat=repeat)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (median(times) * 1e-6) / 1e9


def extra_peak_mib(fn: Callable[[], object]) -> float:
    """Peak memory allocated during fn() above what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def run_json_process(cmd: list[str], timeout: float) -> tuple[dict | None, str]:
    """Run one benchmark variant in its own process, whose last line of stdout is its JSON result:
    (that result, or None when it printed none, and the process's stderr)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr
    except (json.JSONDecodeError, IndexError):
        return None, proc.stderr


def write_rows(name: str, rows: list[dict], out_dir: Path | None = None) -> Path:
    """Append rows to results/<name>.csv (and to out_dir/<name>.csv when given)."""
    stamp = {"date": _dt.date.today().isoformat(), "commit": commit(), "gpu": gpu_name()}
    targets = [RESULTS_DIR / f"{name}.csv"] + ([Path(out_dir) / f"{name}.csv"] if out_dir else [])
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            for row in rows:
                writer.writerow({**stamp, **row})
    return targets[0]


def print_table(rows: list[dict]) -> None:
    cols = ["benchmark", "case", "impl", "median_us", "extra_peak_mib", "limit_us", "fraction_of_limit", "vs_ours", "note"]
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(_fmt(row.get(c, "")) for c in cols))


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
