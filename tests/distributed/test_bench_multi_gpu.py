"""The multi-GPU benchmark's plumbing on CPU processes (gloo), so that a lent multi-GPU machine runs it
first time: the random 4-bit checkpoint (random_checkpoint.py), its pre-quantized load on every rank,
DDP and FSDP2 (NF4 bases sharded) training, the per-rank gather and the summary. On a tiny shape."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import clean_launcher_env, requires_gloo

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_multi_gpu.py"
RESULTS = ROOT / "benchmarks" / "results" / "multi_gpu.csv"

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")


def run_bench(mode: str, counts: str, checkpoint: Path, device: str = "cpu") -> list[dict]:
    command = [sys.executable, str(SCRIPT), "--device", device, "--shape", "tiny", "--mode", mode, "--gpus", counts,
               "--seq", "16", "--batch", "1", "--steps", "2", "--warmup", "1", "--timeout", "240",
               "--checkpoint", str(checkpoint), "--no-record"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=clean_launcher_env(), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["gpus"] for r in results] == [int(c) for c in counts.split(",")], proc.stdout + proc.stderr[-3000:]
    return results


@requires_gloo
def test_ddp_and_fsdp2_runs_of_the_benchmark(tmp_path):
    before = RESULTS.read_bytes() if RESULTS.exists() else None
    checkpoint = tmp_path / "random_4bit"
    ddp = run_bench("ddp", "1,2", checkpoint)
    assert (checkpoint / "config.json").exists()  # written once, reused by the second run
    fsdp2 = run_bench("fsdp2", "2", checkpoint)
    for result in ddp + fsdp2:
        assert result["tokens_per_s_per_gpu"] > 0 and result["trainable"] > 0
        assert result["last_loss"] != result["first_loss"]  # the adapters trained
    # Two ranks, the same batches and the same starting adapters: DDP (all-reduced adapter gradients)
    # and FSDP2 (sharded weights, reduce-scattered gradients) train the same model.
    assert abs(ddp[1]["last_loss"] - fsdp2[0]["last_loss"]) < 1e-4
    assert ddp[1]["first_loss"] == pytest.approx(fsdp2[0]["first_loss"], abs=1e-5)
    # Smoke runs on CPU are never recorded as results.
    assert (RESULTS.read_bytes() if RESULTS.exists() else None) == before


@pytest.mark.gpu
def test_ddp_and_fsdp2_on_one_gpu(tmp_path):
    """NCCL, our CUDA kernels and FSDP2's all-gathered NF4 weights on one GPU (a world of one): what a
    multi-GPU run needs first, checkable on the single GPU that is lent. Same numbers both ways."""
    checkpoint = tmp_path / "random_4bit"
    ddp = run_bench("ddp", "1", checkpoint, device="cuda")
    fsdp2 = run_bench("fsdp2", "1", checkpoint, device="cuda")
    for result in ddp + fsdp2:
        assert result["peak_gib"] > 0 and result["last_loss"] != result["first_loss"]
    assert ddp[0]["first_loss"] == pytest.approx(fsdp2[0]["first_loss"], abs=2e-2)  # bf16
