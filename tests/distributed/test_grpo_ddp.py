"""`loraforge grpo` (grpo_run.run_grpo) under torchrun, two CPU ranks over gloo: TRL's GRPOTrainer (our
subclass) trains our patched 4-bit LoRA model in DDP, the ranks end with the same adapters, which
training changed, and the adapter is written once, by rank 0 (_grpo_worker.py)."""

import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import _grpo_worker as worker
from tests.distributed import clean_launcher_env, free_port, requires_gloo, run_launcher

pytest.importorskip("trl")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def grpo_launch(tmp_path_factory):
    from loraforge import testing

    model_dir = testing.save_tiny_model(tmp_path_factory.mktemp("grpo_ddp") / "tiny_llama", arch="llama", seed=3)
    out = tmp_path_factory.mktemp("grpo_run")
    env = clean_launcher_env()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(Path(worker.__file__)),
               "--model", str(model_dir), "--out", str(out)]  # fmt: skip
    returncode, output = run_launcher(command, "torchrun grpo", timeout_s=150, env=env, check=False)
    return out, returncode, output


def _ranks(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


@requires_gloo
def test_grpo_trains_in_ddp_and_the_ranks_agree(grpo_launch):
    out, returncode, output = grpo_launch
    assert returncode == 0, output[-4000:]
    ranks = _ranks(out)
    assert [r["wrapper"] for r in ranks] == ["DistributedDataParallel"] * 2
    assert [r["find_unused"] for r in ranks] == [False, False]
    assert all(len(r["rewards"]) == 2 for r in ranks), [r["rewards"] for r in ranks]
    first, second = ranks
    assert first["initial"].keys() == first["trained"].keys() and len(first["trained"]) > 0
    # DDP kept the replicas in step: the same adapters on both ranks after two optimizer steps ...
    for name, weight in first["trained"].items():
        assert torch.equal(weight, second["trained"][name]), name
        assert torch.equal(first["initial"][name], second["initial"][name]), name
    # ... and the steps did something (lora_B starts at zero under PEFT's default initialisation).
    moved = [n for n in first["trained"] if not torch.equal(first["trained"][n], first["initial"][n])]
    assert moved and any("lora_B" in n for n in moved), moved


@requires_gloo
def test_grpo_adapter_is_saved_once_by_rank_0(grpo_launch):
    out, returncode, output = grpo_launch
    assert returncode == 0, output[-4000:]
    savers = sorted(int(line) for line in (out / "savers.log").read_text().split())
    assert savers == [0], output[-4000:]
    assert [p.parent for p in out.rglob("adapter_model.safetensors")] == [out / "run" / "adapter"]
