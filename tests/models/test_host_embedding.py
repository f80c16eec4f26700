"""offload_embedding=True: the input embedding table in pinned host memory, read in place by the GPU.

On CPU only the refusals can run (there is no device address for host memory there). On CUDA (`gpu`): the
table's bytes leave the GPU, the weight's address is the pinned table's, and loss, LoRA gradients, greedy
generation, state_dict and the undo equal the same model with its table on the GPU."""

import gc
import random

import pytest
import torch

from loraforge import FastLanguageModel, testing
from loraforge.models import host_embedding
from tests.models._lora_runs import load_with_adapters, loss_and_grads, padded_prompts


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return testing.save_tiny_model(tmp_path_factory.mktemp("embedding") / "llama", arch="llama", seed=5,
                                   hidden_size=256, intermediate_size=512, num_hidden_layers=3)  # fmt: skip


def test_arguments_are_checked_before_loading(llama_dir):
    with pytest.raises(TypeError, match='offload_embedding must be True, False or "auto"'):
        FastLanguageModel.from_pretrained(llama_dir, offload_embedding="yes")
    with pytest.raises(TypeError, match='offload_embedding must be True, False or "auto"'):
        FastLanguageModel.from_pretrained(llama_dir, offload_embedding=1)
    with pytest.raises(ValueError, match="full_finetuning=True the table trains"):
        FastLanguageModel.from_pretrained(llama_dir, full_finetuning=True, offload_embedding=True)


def test_a_table_on_the_cpu_is_refused(llama_dir):
    with pytest.raises(ValueError, match="moves a GPU table to host memory; this model's is on cpu"):
        FastLanguageModel.from_pretrained(llama_dir, device_map="cpu", offload_embedding=True)


def test_trained_tied_and_odd_tables_are_refused(tmp_path):
    """Each refusal comes before anything moves (the checks run before the device check, so on CPU too)."""
    tied_dir = testing.save_tiny_model(tmp_path / "qwen3", arch="qwen3", seed=1, num_hidden_layers=1)
    tied, _ = FastLanguageModel.from_pretrained(tied_dir, device_map="cpu", load_in_4bit=False)
    with pytest.raises(ValueError, match="ties its input embedding to the output head"):
        host_embedding.offload_input_embeddings(tied)
    untied_dir = testing.save_tiny_model(tmp_path / "llama", arch="llama", seed=1, num_hidden_layers=1)
    model, _ = FastLanguageModel.from_pretrained(untied_dir, device_map="cpu", load_in_4bit=False)
    table = model.get_input_embeddings().weight
    table.requires_grad_(True)
    with pytest.raises(ValueError, match="needs a frozen input embedding"):
        host_embedding.offload_input_embeddings(model)
    table.requires_grad_(False)
    model.get_input_embeddings().weight = torch.nn.Parameter(table.detach().double(), requires_grad=False)
    with pytest.raises(ValueError, match="16- or 32-bit table, got torch.float64"):
        host_embedding.offload_input_embeddings(model)
    with pytest.raises(TypeError, match="get_input_embeddings\\(\\) is a torch.nn.Embedding"):
        host_embedding.offload_input_embeddings(torch.nn.Linear(2, 2))
    assert not host_embedding.is_offloaded(model)
    host_embedding.restore_input_embeddings(model)  # not offloaded: a no-op


def test_auto_leaves_every_table_that_cannot_go_where_it_is(tmp_path, llama_dir, monkeypatch):
    """offload_embedding="auto" (the default) never raises: a table on the CPU, tied, trained or 64-bit stays."""
    model, _ = FastLanguageModel.from_pretrained(llama_dir, device_map="cpu")  # the default: "auto"
    assert not host_embedding.is_offloaded(model) and not model.get_input_embeddings().weight.is_cuda
    full, _ = FastLanguageModel.from_pretrained(llama_dir, device_map="cpu", full_finetuning=True)  # no refusal
    assert full.get_input_embeddings().weight.requires_grad
    assert not host_embedding.offload_where_possible(full)
    tied_dir = testing.save_tiny_model(tmp_path / "qwen3", arch="qwen3", seed=1, num_hidden_layers=1)
    tied, _ = FastLanguageModel.from_pretrained(tied_dir, device_map="cpu", load_in_4bit=False)
    assert not host_embedding.offload_where_possible(tied)
    table = model.get_input_embeddings().weight
    model.get_input_embeddings().weight = torch.nn.Parameter(table.detach().double(), requires_grad=False)
    assert not host_embedding.offload_where_possible(model)
    assert not host_embedding.offload_where_possible(torch.nn.Linear(2, 2))  # no embedding at all
    assert model.get_input_embeddings().weight.dtype == torch.float64  # untouched


# ---------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.gpu
def test_cuda_auto_offloads_a_table_that_qualifies_in_a_single_process(tmp_path, llama_dir, monkeypatch):
    model, _ = FastLanguageModel.from_pretrained(llama_dir, dtype=torch.bfloat16)  # the default: "auto"
    assert host_embedding.is_offloaded(model)
    kept, _ = FastLanguageModel.from_pretrained(llama_dir, dtype=torch.bfloat16, offload_embedding=False)
    assert not host_embedding.is_offloaded(kept) and kept.get_input_embeddings().weight.is_cuda
    full, _ = FastLanguageModel.from_pretrained(llama_dir, dtype=torch.bfloat16, full_finetuning=True)
    assert not host_embedding.is_offloaded(full)
    tied_dir = testing.save_tiny_model(tmp_path / "qwen3", arch="qwen3", seed=1, num_hidden_layers=1)
    tied, _ = FastLanguageModel.from_pretrained(tied_dir, dtype=torch.bfloat16)
    assert not host_embedding.is_offloaded(tied)
    monkeypatch.setenv("WORLD_SIZE", "2")  # a torchrun launch before its process group exists: DDP comes later
    launched, _ = FastLanguageModel.from_pretrained(llama_dir, dtype=torch.bfloat16)
    assert not host_embedding.is_offloaded(launched)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_cuda_offloaded_table_trains_and_generates_as_the_gpu_one(llama_dir, dtype):
    from loraforge import fast_generate

    gc.collect()  # an earlier test's models, freed during the first load, would shrink plain_bytes
    start = torch.cuda.memory_allocated()
    plain, tokenizer = load_with_adapters(llama_dir, dtype, offload_embedding=False)
    plain_bytes = torch.cuda.memory_allocated() - start
    offloaded, _ = load_with_adapters(llama_dir, dtype, offload_embedding=True)
    offloaded_bytes = torch.cuda.memory_allocated() - start - plain_bytes
    table = offloaded.get_input_embeddings().weight
    host = offloaded.get_input_embeddings().__dict__[host_embedding._HOST_ATTR]
    # The table is a CUDA tensor at the pinned host table's address; the GPU holds one model minus its table.
    assert table.is_cuda and host.is_pinned() and table.data_ptr() == host.data_ptr()
    assert host_embedding.is_offloaded(offloaded)
    table_bytes = table.numel() * table.element_size()
    assert offloaded_bytes == pytest.approx(plain_bytes - table_bytes, abs=table_bytes * 0.05)
    assert torch.equal(table.cpu(), plain.get_input_embeddings().weight.cpu())
    seed = random.randrange(1 << 30)
    for _ in range(2):
        ids = torch.randint(0, 500, (2, 77), device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        loss, grads = loss_and_grads(plain, ids)
        loss_o, grads_o = loss_and_grads(offloaded, ids)
        assert torch.equal(loss, loss_o) and grads.keys() == grads_o.keys()
        assert all(torch.equal(grads[k], grads_o[k]) for k in grads)
        seed += 1
    batch = padded_prompts(tokenizer)
    kwargs = {"max_new_tokens": 20, "do_sample": False, "eos_token_id": None}
    for model in (plain, offloaded):
        FastLanguageModel.for_inference(model)
    expected = fast_generate(plain, **batch, **kwargs, use_cuda_graph=False)
    assert torch.equal(fast_generate(offloaded, **batch, **kwargs, use_cuda_graph=False), expected)
    assert torch.equal(fast_generate(offloaded, **batch, **kwargs), expected)  # CUDA-graph decoding
    # Undo: the table back in GPU memory, the same bytes, and the pinned one released.
    key = next(k for k in offloaded.state_dict() if k.endswith("embed_tokens.weight"))
    saved = offloaded.state_dict()[key].cpu()
    host_embedding.restore_input_embeddings(offloaded)
    restored = offloaded.get_input_embeddings().weight
    assert not host_embedding.is_offloaded(offloaded) and restored.data_ptr() != host.data_ptr()
    assert torch.equal(restored.cpu(), saved) and not restored.requires_grad


def test_a_table_moved_since_its_offload_counts_as_not_offloaded():
    """model.cpu() or model.half() after an offload leave an ordinary tensor behind the module: it is then
    neither reported as offloaded nor 'restored' (the stale pinned table is dropped). A CPU stand-in: the
    module carries a pinned-table record, but its weight is a host tensor elsewhere."""
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(10, 4)
    model.get_input_embeddings = lambda: model.embed
    model.embed.__dict__[host_embedding._HOST_ATTR] = torch.empty(10, 4)
    weight = model.embed.weight
    assert not host_embedding.is_offloaded(model)
    host_embedding.restore_input_embeddings(model)
    assert host_embedding._HOST_ATTR not in model.embed.__dict__ and model.embed.weight is weight


@pytest.mark.gpu
def test_cuda_a_moved_table_can_be_offloaded_again(llama_dir):
    model, _ = FastLanguageModel.from_pretrained(llama_dir, dtype=torch.bfloat16, offload_embedding=True)
    embedding = model.get_input_embeddings()
    expected = embedding.weight.cpu()
    assert host_embedding.is_offloaded(model)
    embedding.to("cpu")  # an ordinary host tensor now, not the pinned table
    assert not host_embedding.is_offloaded(model)
    embedding.to("cuda")  # an ordinary GPU table
    assert not host_embedding.is_offloaded(model)
    host_embedding.offload_input_embeddings(model)
    assert host_embedding.is_offloaded(model) and torch.equal(model.get_input_embeddings().weight.cpu(), expected)


def test_torch_distributed_is_refused(monkeypatch):
    import torch.distributed as dist

    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(10, 4).requires_grad_(False)
    model.get_input_embeddings = lambda: model.embed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    with pytest.raises(NotImplementedError, match="offload_embedding with torch.distributed"):
        host_embedding.offload_input_embeddings(model)


@pytest.mark.gpu
def test_cuda_the_freed_table_keeps_more_layers_out_of_the_checkpoint(tmp_path):
    """With the table in host memory, the last layer's kept forward is measured in the first step, and from
    the second on as many more layers run whole as the table's bytes pay for at the batch's tokens; the loss
    and LoRA gradients stay those of the model whose table is on the GPU (every other layer checkpointed)."""
    from loraforge.train import kept_layer_budget

    path = testing.save_tiny_model(tmp_path / "wide", arch="llama", seed=3, hidden_size=256,
                                   intermediate_size=512, num_hidden_layers=5)  # fmt: skip
    plain, _ = load_with_adapters(path, torch.float32, offload_embedding=False)
    offloaded, _ = load_with_adapters(path, torch.float32, offload_embedding=True)
    table_bytes = kept_layer_budget.table_bytes(offloaded)
    rows = plain.get_input_embeddings().weight.shape[0]  # (the tokenizer's vocabulary, which sets the table's)
    assert table_bytes == rows * 256 * 4 and kept_layer_budget.table_bytes(plain) == 0
    whole = []
    run_kept = kept_layer_budget.run_kept

    def recording(layer, tokens, function, args, kwargs):
        whole.append(layer)
        return run_kept(layer, tokens, function, args, kwargs)

    # What the measured layer saves, counted by autograd's hooks: the allocator's figure must match it.
    decoder = offloaded.base_model.model.model.layers
    saved, inside = {}, [False]
    decoder[-1].register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
    decoder[-1].register_forward_hook(lambda *a: inside.__setitem__(0, False))
    parameters = {p.untyped_storage().data_ptr() for p in offloaded.parameters()}

    def pack(t):
        if inside[0] and t.untyped_storage().data_ptr() not in parameters:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    g = torch.Generator("cuda").manual_seed(random.randrange(1 << 30))
    ids = torch.randint(0, 500, (2, 96), device="cuda", generator=g)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_o, grads_o = loss_and_grads(offloaded, ids)
    per_token = kept_layer_budget.bytes_per_token(offloaded)
    assert per_token == pytest.approx(sum(saved.values()) / ids.numel(), rel=0.25)
    loss, grads = loss_and_grads(plain, ids)
    torch.testing.assert_close(loss_o, loss)
    for n_tokens in (2 * 96, 9):
        ids = torch.randint(0, 500, (1, n_tokens), device="cuda", generator=g)
        per_token = kept_layer_budget.bytes_per_token(offloaded)  # (the largest so far)
        expected_extra = min(4, table_bytes // (per_token * n_tokens))  # (5 layers: the last one fixed)
        whole.clear()
        kept_layer_budget.run_kept = recording
        try:
            loss_o, grads_o = loss_and_grads(offloaded, ids)
        finally:
            kept_layer_budget.run_kept = run_kept
        assert len(whole) == 1 + expected_extra and whole[-1] is decoder[-1]
        loss, grads = loss_and_grads(plain, ids)
        torch.testing.assert_close(loss_o, loss)
        assert grads.keys() == grads_o.keys()
        for k in grads:
            torch.testing.assert_close(grads_o[k], grads[k], rtol=1e-4, atol=1e-6)
