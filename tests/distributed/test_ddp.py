"""DDP on two CPU ranks (gloo) against one process on the whole batch, and rank-0-only saving.

One torchrun launch (module fixture) trains, per mode, the same tiny Llama with loraforge's fused
forwards: 16-bit LoRA with AdamW and mean losses over equal halves, and 4-bit NF4 with SGD and
summed losses over halves with different target counts (normalised by data_parallel_num_items).
"""

import json

import pytest
import torch

from loraforge import distributed as lfd
from tests.distributed import launch_workers, requires_gloo

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

MODES = ("16bit", "4bit")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    launch_workers("ddp", out, timeout_s=60)
    return out


def _load(path):
    return torch.load(path, weights_only=True)


@requires_gloo
@pytest.mark.parametrize("mode", MODES)
def test_ddp_adapters_match_one_process_on_the_whole_batch(ddp_run, mode):
    reference = _load(ddp_run / f"reference_{mode}.pt")
    ranks = [_load(ddp_run / f"ddp_{mode}_rank{rank}.pt") for rank in (0, 1)]
    # Both replicas took identical steps (DDP hands every rank the same averaged gradient).
    for name in reference["adapters"]:
        assert torch.equal(ranks[0]["adapters"][name], ranks[1]["adapters"][name]), name
    # Training moved the adapters far more than the tolerance, so a match is not trivial.
    moved = max((reference["adapters"][n] - reference["initial"][n]).abs().max().item() for n in reference["initial"])
    assert moved > 1e-3
    assert ranks[0]["adapters"].keys() == reference["adapters"].keys()
    for name, expected in reference["adapters"].items():
        # fp32 all-reduce of two half-batch gradients vs one full-batch gradient: rounding only.
        torch.testing.assert_close(ranks[0]["adapters"][name], expected, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(reference["losses"]),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


@requires_gloo
@pytest.mark.parametrize("mode", MODES)
def test_ddp_reducer_holds_only_the_adapters(ddp_run, mode):
    reducer = _load(ddp_run / f"ddp_{mode}_rank0.pt")["reducer"]
    assert reducer["frozen_tensors"] > 0
    assert reducer["reducer_tensors"] == reducer["trainable_tensors"]
    assert reducer["reducer_bytes"] == reducer["trainable_bytes"]


@requires_gloo
def test_save_on_main_writes_the_adapter_once(ddp_run):
    folder = ddp_run / "ddp_save"
    assert (ddp_run / "ddp_save_writers.log").read_text() == "0\n"
    assert [p.parent for p in ddp_run.rglob("adapter_model.safetensors")] == [folder]  # one file, one place
    assert (folder / "adapter_config.json").is_file()
    seen = [json.loads((ddp_run / f"ddp_save_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert seen[0]["returned"] == str(folder) and seen[1]["returned"] is None
    # No rank returns before rank 0 has written.
    assert all(s["adapter_exists_on_return"] for s in seen)

    from safetensors.torch import load_file

    saved = load_file(folder / "adapter_model.safetensors")
    trained = _load(ddp_run / "ddp_4bit_rank0.pt")["adapters"]
    assert len(saved) == len(trained)
    for name, tensor in trained.items():
        torch.testing.assert_close(saved[name.replace(".default", "")], tensor, rtol=0, atol=0)


@requires_gloo
def test_save_on_main_failure_reaches_every_rank(ddp_run):
    seen = [json.loads((ddp_run / f"ddp_save_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert seen[0]["failure"] == "OSError: disk full (simulated)"
    assert seen[1]["failure"].startswith("RuntimeError: rank 0 failed in failing_export: OSError: disk full")


# ---- one process, no launcher ----------------------------------------------------------------


@pytest.fixture
def single_process(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def test_single_process_world(single_process):
    assert lfd.world_info() == lfd.WorldInfo(rank=0, local_rank=0, world_size=1)
    assert lfd.is_main_process()
    assert lfd.init_distributed() == lfd.WorldInfo(0, 0, 1)  # no launcher: no process group
    lfd.barrier()


def test_world_info_reads_the_launcher_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert lfd.world_info() == lfd.WorldInfo(rank=3, local_rank=1, world_size=4)
    assert not lfd.is_main_process()


def test_save_on_main_in_one_process_just_runs(single_process, tmp_path):
    calls = []
    assert lfd.save_on_main(lambda path: calls.append(path) or "done")(tmp_path) == "done"
    assert calls == [tmp_path]


def test_data_parallel_num_items_in_one_process_counts_shifted_targets(single_process):
    labels = torch.tensor([[-100, 5, 6, -100], [7, 8, 9, 10]])
    # Targets are labels[:, 1:]: (5, 6, -100) and (8, 9, 10).
    assert lfd.data_parallel_num_items(labels).item() == 5


def test_prepare_ddp_needs_a_process_group(single_process):
    with pytest.raises(RuntimeError, match="process group"):
        lfd.prepare_ddp(torch.nn.Linear(2, 2))
