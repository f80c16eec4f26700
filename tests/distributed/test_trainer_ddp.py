"""SFT through transformers' Trainer under a launcher: the Trainer (through accelerate) wraps our
patched 4-bit LoRA model in DDP itself. Two CPU ranks over gloo, per-device batch 2, against one
process with per-device batch 4 on the same data in the same order.

How the Trainer gets gloo: TrainingArguments(use_cpu=True) builds accelerate's
PartialState(cpu=True, backend=None); with LOCAL_RANK / WORLD_SIZE set by the launcher that is
DistributedType.MULTI_CPU with backend "gloo" (MPI only where torch was built with it). The
environment only has to let gloo bind (GLOO_SOCKET_IFNAME=lo) and keep one thread per rank.

Why the comparison is exact (up to fp32 rounding), although the ranks' shares hold different
numbers of targets: our model takes `num_items_in_batch`, so the Trainer (average_tokens_across_
devices, on by default) passes it the target count N of the whole global batch, gathered over
ranks, and multiplies each rank's loss S_r / N by the world size W. DDP averages the gradients:
(1/W) sum_r W dS_r / N = d(sum_r S_r) / N, the one-process gradient of the global batch; the
logged loss, the mean over ranks of W S_r / N, is likewise sum_r S_r / N. (Averaging each rank's
own mean instead would be a different objective: test_the_comparison_can_fail shows by how much.)
Data order: sequential sampling; accelerate's BatchSamplerShard hands rank r the r-th per-device
batch of each run of W, so ranks 0 and 1 together see the one-process batch of 4, rows in order.
SGD without clipping: the step is -lr times the gradient, so any error in it reaches the weights.
fp32 throughout: TRL's SFTConfig defaults to bf16 (autocast, on CPU too: a 1e-3 difference between
runs with differently shaped batches), so the worker sets bf16=False as build_trainer does on CPU;
TRL also casts a 4-bit model's adapters to bf16, which the worker casts back (the same start for both).
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import _trainer_worker as worker
from tests.distributed import clean_launcher_env, free_port, requires_gloo, run_launcher

pytest.importorskip("trl")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytest.importorskip("datasets")

WORKER = Path(worker.__file__)
# Replicas of a correct run differ from the one-process run by fp32 reduction order only
# (all-reduce of two gradients, matmuls over differently padded batches): measured 2e-8 after 4 steps.
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from loraforge import testing

    return testing.save_tiny_model(tmp_path_factory.mktemp("trainer_ddp") / "tiny_llama", arch="llama", seed=3)


@pytest.fixture(scope="module")
def one_process(model_dir, tmp_path_factory):
    """The reference: the same worker code in this process, world size 1, per-device batch 4."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run (OMP_NUM_THREADS=1)
    try:
        return worker.train(model_dir, tmp_path_factory.mktemp("one_process"), per_device_batch=4)
    finally:
        torch.set_num_threads(threads)


def _launch(kind: str, model_dir: Path, out: Path, mode: str = "trainer", check: bool = True):
    script = [str(WORKER), "--mode", mode, "--model", str(model_dir), "--out", str(out), "--per-device-batch", "2"]
    env = clean_launcher_env()
    if kind == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                   "--master-addr=127.0.0.1", f"--master-port={free_port()}"]  # fmt: skip
    else:
        # accelerate's multi-process launcher is the torchrun-based one behind --multi_gpu (--cpu means
        # one process; its multi-CPU launcher needs mpirun); the script's use_cpu=True makes it gloo.
        # HF_HOME: no accelerate config file of the machine's user may change the launch.
        env["HF_HOME"] = str(out / "hf_home")
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
                   "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no",
                   "--main_process_ip=127.0.0.1", f"--main_process_port={free_port()}"]  # fmt: skip
    return run_launcher(command + script, f"{kind} {mode}", timeout_s=90, env=env, check=check)


def _ranks(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


@pytest.fixture(scope="module")
def torchrun_run(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun")
    _launch("torchrun", model_dir, out)
    return out


@pytest.fixture(scope="module")
def accelerate_run(model_dir, tmp_path_factory):
    pytest.importorskip("accelerate.commands.launch", reason="accelerate's launcher is not installed")
    out = tmp_path_factory.mktemp("accelerate")
    _launch("accelerate", model_dir, out)
    return out


LAUNCHERS = ("torchrun_run", "accelerate_run")


@requires_gloo
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_trainer_ddp_matches_one_process_on_the_global_batch(request, launcher, one_process):
    ranks = _ranks(request.getfixturevalue(launcher))
    assert [(r["world_size"], r["process_index"], r["backend"]) for r in ranks] == [(2, 0, "gloo"), (2, 1, "gloo")]
    assert one_process["world_size"] == 1
    assert bool(ranks[0]["accelerate_env"]) == (launcher == "accelerate_run")
    # The Trainer wrapped the model in DDP as asked (no unused-parameter search); one process: no wrapper.
    for step in ranks[0]["seen"] + ranks[1]["seen"]:
        assert (step["wrapper"], step["find_unused"]) == ("DistributedDataParallel", False)
    assert all(step["wrapper"] != "DistributedDataParallel" for step in one_process["seen"])

    # Same data, same order: each step's rank-0 rows then rank-1 rows are the one-process batch,
    # which is the next 4 rows of the dataset (sequential, 2 batches per epoch).
    rows = worker.sequences(one_process["vocab_size"])
    assert len(one_process["seen"]) == len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == worker.STEPS
    for step, (alone, first, second) in enumerate(zip(one_process["seen"], ranks[0]["seen"], ranks[1]["seen"])):
        start = 4 * step % len(rows)
        assert alone["rows"] == rows[start : start + 4]
        assert first["rows"] + second["rows"] == alone["rows"]
        # The shares hold different numbers of targets (so the normaliser matters), and every rank
        # normalises by the target count of the whole global batch.
        assert first["targets"] != second["targets"]
        assert first["num_items"] == second["num_items"] == alone["num_items"] == first["targets"] + second["targets"]
        # Each rank's loss is W * S_r / N; their mean is the one-process loss S / N.
        assert abs((first["loss"] + second["loss"]) / 2 - alone["loss"]) <= 1e-6 * alone["loss"]

    # Every replica took the same steps (DDP gave each the same averaged gradient).
    final = [r["final"] for r in ranks]
    assert final[0].keys() == final[1].keys() == one_process["final"].keys()
    assert all(torch.equal(final[0][n], final[1][n]) for n in final[0])
    assert any("lora_A" in n for n in final[0]) and any("lora_B" in n for n in final[0])
    # Training moved the adapters far beyond the tolerance, so the match below is not trivial.
    moved = max((one_process["final"][n] - one_process["initial"][n]).abs().max().item() for n in final[0])
    assert moved > 1000 * ATOL
    for name, expected in one_process["final"].items():
        torch.testing.assert_close(final[0][name], expected, rtol=RTOL, atol=ATOL, msg=name)

    # Logged losses (the Trainer's, gathered over ranks) agree, are finite and go down: steps 3 and 4
    # see the batches of steps 1 and 2 again, after two SGD steps.
    logged = [loss for _, loss in ranks[0]["logged"]]
    expected = [loss for _, loss in one_process["logged"]]
    assert len(logged) == worker.STEPS and all(torch.isfinite(torch.tensor(logged)))
    torch.testing.assert_close(torch.tensor(logged), torch.tensor(expected), rtol=1e-6, atol=0)
    assert logged[2] < logged[0] and logged[3] < logged[1]


@requires_gloo
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_rank0_saves_the_trained_adapter_once(request, launcher, one_process):
    from safetensors.torch import load_file

    out = request.getfixturevalue(launcher)
    ranks = _ranks(out)
    assert ranks[0]["saved"] == str(out / "adapter") and ranks[1]["saved"] is None
    assert [p.parent for p in out.rglob("adapter_model.safetensors")] == [out / "adapter"]
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(n.replace(".default", "") for n in ranks[0]["final"])
    for name, tensor in ranks[0]["final"].items():
        assert torch.equal(saved[name.replace(".default", "")], tensor), name
        torch.testing.assert_close(tensor, one_process["final"][name], rtol=RTOL, atol=ATOL, msg=name)


def test_the_comparison_can_fail(model_dir, one_process, tmp_path):
    """Averaging each rank's own mean loss (what DDP gives without the global normaliser) takes a
    first SGD step that differs from the reference's by far more than the tolerance."""
    model, _ = worker.load_model(model_dir, tmp_path, per_device_batch=4)
    model.train()
    for name, param in model.named_parameters():
        if param.requires_grad:  # the reference's start (its adapters went through TRL's bf16 cast)
            param.data = one_process["initial"][name].clone()
    shares = [one_process["seen"][0]["rows"][:2], one_process["seen"][0]["rows"][2:]]

    def gradient(normalisers):
        model.zero_grad(set_to_none=True)
        for share, (weight, count) in zip(shares, normalisers):
            for row in share:
                ids = torch.tensor([row])
                (weight * model(input_ids=ids, labels=ids, num_items_in_batch=count).loss).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    counts = [sum(len(row) - 1 for row in share) for share in shares]
    assert counts[0] != counts[1]
    total = sum(counts)
    global_mean = gradient([(1.0, total), (1.0, total)])
    mean_of_means = gradient([(0.5, counts[0]), (0.5, counts[1])])
    gap = max((global_mean[n] - mean_of_means[n]).abs().max().item() for n in global_mean)
    assert worker.LEARNING_RATE * gap > 100 * ATOL  # measured: 7.7e-3, against ATOL 1e-6


# ---- `loraforge sft` (sft.run_sft) as it is, under torchrun ------------------------------------


@pytest.fixture(scope="module")
def run_sft_launch(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_sft")
    rows = [{"text": f"Row {i}: the quick brown fox jumps over {i} lazy dogs."} for i in range(8)]
    (out / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    returncode, output = _launch("torchrun", model_dir, out, mode="run_sft", check=False)
    return out, returncode, output


@requires_gloo
def test_run_sft_under_torchrun_trains_with_ddp(run_sft_launch):
    out, _, output = run_sft_launch
    records = [out / f"run_sft_trained_rank{rank}.json" for rank in (0, 1)]
    assert all(path.exists() for path in records), output[-4000:]
    assert all(json.loads(path.read_text())["wrapper"] == "DistributedDataParallel" for path in records)


@requires_gloo
def test_run_sft_under_torchrun_saves_the_adapter_once(run_sft_launch):
    out, returncode, output = run_sft_launch
    savers = sorted(int(line) for line in (out / "run_sft_savers.log").read_text().split())
    assert savers == [0], output[-4000:]
    assert returncode == 0, output[-4000:]
    assert [p.parent for p in out.rglob("adapter_model.safetensors")] == [out / "run" / "adapter"]


@requires_gloo
def test_run_sft_under_torchrun_builds_ddp_without_unused_parameter_search(run_sft_launch):
    out, _, _ = run_sft_launch
    records = [json.loads((out / f"run_sft_trained_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(r["find_unused"] is False for r in records)
