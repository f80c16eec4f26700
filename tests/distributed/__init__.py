"""Multi-process tests: two CPU ranks over gloo, launched with torchrun (or accelerate launch), each
running _worker.py (our DDP/FSDP2 helpers) or _trainer_worker.py (transformers' Trainer doing DDP).

`run_launcher` runs a launch to completion or kills it: a hung collective must fail the test
within its time limit, not block CI. `launch_workers` is that for one scenario of _worker.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

WORKER = Path(__file__).with_name("_worker.py")

requires_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with the gloo backend"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_workers(scenario: str, out: Path, nproc: int = 2, timeout_s: float = 60) -> str:
    """Run `_worker.py --scenario scenario --out out` on `nproc` ranks; returns the combined output."""
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(WORKER),
        "--scenario", scenario, "--out", str(out),
    ]  # fmt: skip
    return run_launcher(command, scenario, timeout_s)[1]


def launcher_env(**extra: str) -> dict[str, str]:
    """The environment for a multi-process launch on this machine's CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    if sys.platform == "linux":
        # gloo otherwise binds to the address the host name resolves to, which containers and
        # sandboxes often lack; both ranks are on this machine anyway.
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def clean_launcher_env() -> dict[str, str]:
    """launcher_env() without a launcher's own variables: those of a launch that started pytest itself
    would leak into the ranks."""
    env = launcher_env()
    for name in [k for k in env if k.startswith("ACCELERATE_") or k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")]:
        del env[name]
    return env


def run_launcher(command: list[str], what: str, timeout_s: float, env: dict | None = None,
                 check: bool = True) -> tuple[int, str]:  # fmt: skip
    """Run a launcher command (torchrun, accelerate launch) to completion or kill it; returns
    (exit status, combined output). check: raise AssertionError on a non-zero exit status."""
    env = launcher_env() if env is None else env
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # torchrun starts each rank in a session of its own; on SIGTERM it terminates them itself.
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        raise AssertionError(f"{what} workers did not finish within {timeout_s:.0f} s:\n{output[-6000:]}")
    if check and proc.returncode != 0:
        raise AssertionError(f"{what} workers failed (exit {proc.returncode}):\n{output[-6000:]}")
    return proc.returncode, output
