"""Host time against GPU time of one decoder layer of the 8B QLoRA model (batch 2 x 2,048, r=16 on all
seven projections), and what a CUDA graph of the layer's no-grad forward would save: the question behind
graphing the offloaded checkpoint's forward pass. Not a benchmark of record.

Per phase, 20 calls back to back: host ms a call (Python returns, no sync) and GPU ms a call (events
around the whole run). Phases: the no-grad forward (what the checkpoint's forward pass runs), the same
replayed from a CUDA graph, and the recompute + backward with autograd (what the backward pass runs).

    python benchmarks/layer_graph_probe.py [--checkpoint DIR] [--layers 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import bench_train_step  # noqa: E402

CALLS = 20


def timed(fn) -> dict:
    """Host ms a call (until Python returns, the device not waited for) and GPU ms a call."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(CALLS):
        fn()
    host = (time.perf_counter() - t0) * 1e3 / CALLS
    end.record()
    torch.cuda.synchronize()
    return {"host_ms": round(host, 3), "gpu_ms": round(start.elapsed_time(end) / CALLS, 3)}


def first(out):
    return out[0] if isinstance(out, tuple) else out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/probe_ck"))
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    if not (args.checkpoint / "config.json").exists():
        bench_train_step.write_checkpoint(args.checkpoint, args.layers)
    model = bench_train_step.load("loraforge", str(args.checkpoint), 2048)
    model.train()
    inner = model.base_model.model.model
    layer = inner.layers[0]
    hidden = torch.randn(2, 2048, 4096, device="cuda", dtype=torch.bfloat16)
    position_ids = torch.arange(2048, device="cuda")[None].expand(2, -1)
    cos_sin = inner.rotary_emb(hidden, position_ids)
    kwargs = {"position_embeddings": cos_sin, "position_ids": position_ids, "attention_mask": None}

    def forward_no_grad():
        with torch.no_grad():
            return first(layer.forward(hidden, **kwargs))

    results = {"no_grad_forward": timed(forward_no_grad)}

    grad = torch.randn_like(hidden)

    def recompute_backward():
        x = hidden.detach().requires_grad_()
        first(layer.forward(x, **kwargs)).backward(grad)

    results["recompute_and_backward"] = timed(recompute_backward)

    eager_out = forward_no_grad()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            forward_no_grad()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            graph_out = forward_no_grad()
        results["graph_replay"] = timed(graph.replay)
        graph.replay()
        results["graph_equals_eager"] = bool(torch.equal(graph_out, eager_out))
        results["graph_max_abs_diff"] = (graph_out.float() - eager_out.float()).abs().max().item()
    except Exception as error:  # noqa: BLE001  (what breaks capture is the finding)
        results["graph_capture_error"] = f"{type(error).__name__}: {error}"[:800]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
