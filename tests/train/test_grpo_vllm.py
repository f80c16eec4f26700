"""TRL's vLLM mode with loraforge models (issue 7: "TRL's vLLM mode keeps working where vLLM is installed").

vLLM itself needs a GPU and cannot be installed here, so the server is stood in for at TRL's client
boundary (`VLLMClient`): the stand-in is a plain transformers model loaded from the same checkpoint,
which takes the weights TRL pushes (by the names vLLM loads them under, as vLLM's `load_weights` does)
and generates from them, returning the sampled tokens' log-probabilities as a server started with
`--logprobs-mode processed_logprobs` does. Everything on the trainer's side is TRL's own code: the
weight sync (PEFT's merge_adapter, the walk over the parameters, unmerge_adapter), the request, the
importance-sampling correction. What this checks about loraforge:

* our GRPOTrainer leaves rollouts to vLLM (fast_generate is not used), and training runs through it;
* the weights pushed are the merged policy (base + scale * B @ A) under their plain transformers names,
  even though our patched forwards cache views of the base weights and the adapters;
* after the sync the adapters are unmerged and our fused path scores as before: the policy's
  log-probabilities equal the server's (TRL's `sampling_logp_difference` metric), which fails if the
  pushed weights are not the policy or if merge/unmerge left a stale cache behind.
"""

import pytest
import torch

from loraforge import FastLanguageModel, testing

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
grpo = pytest.importorskip("loraforge.train.grpo")
vllm_generation = pytest.importorskip("trl.generation.vllm_generation")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see tests/conftest.py

SCALE = 16 / 8  # lora_alpha / r below


class StandInServer:
    """What TRL's VLLMClient talks to, for one process: weight updates by name, then generation."""

    def __init__(self, path, eos_token_id):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.eos_token_id = eos_token_id
        self.pushed: list[dict[str, torch.Tensor]] = []  # one dict per sync
        self.generate_calls = 0
        self.generator = torch.Generator().manual_seed(0)

    # The VLLMClient surface TRL's server mode uses.
    def __call__(self, *args, **kwargs):  # stands in for the VLLMClient class: "constructing" returns self
        return self

    def init_communicator(self, device=None):
        pass

    def get_server_info(self):
        return {"model_config": {"logprobs_mode": "processed_logprobs"}}

    def reset_prefix_cache(self):
        pass

    def update_named_params(self, metadata, named_tensors):
        received = {}
        for (name, dtype, shape), (tensor_name, tensor) in zip(metadata, named_tensors, strict=True):
            assert name == tensor_name and list(tensor.shape) == shape and str(tensor.dtype) == f"torch.{dtype}"
            received[name] = tensor.detach().clone()
        parameters = dict(self.model.named_parameters())
        for name, tensor in received.items():
            if name in parameters and parameters[name].shape == tensor.shape and tensor.is_floating_point():
                parameters[name].data.copy_(tensor)
        self.pushed.append(received)

    @torch.no_grad()
    def generate(self, prompts, n=1, temperature=1.0, max_tokens=16, **kwargs):
        """n sampled completions per prompt at `temperature` (seeded), each token with its log-probability
        under the temperature-scaled distribution, as vLLM reports it."""
        self.generate_calls += 1
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "logprob_token_ids": []}
        for prompt in prompts:
            for _ in range(n):
                ids = torch.tensor([prompt])
                tokens, logprobs = [], []
                for _ in range(max_tokens):
                    logp = torch.log_softmax(self.model(ids).logits[0, -1].float() / temperature, -1)
                    token = int(torch.multinomial(logp.exp(), 1, generator=self.generator))
                    tokens.append(token)
                    logprobs.append([float(logp[token])])
                    ids = torch.cat([ids, torch.tensor([[token]])], 1)
                    if token == self.eos_token_id:
                        break
                out["prompt_ids"].append(list(prompt))
                out["completion_ids"].append(tokens)
                out["logprobs"].append(logprobs)
                out["logprob_token_ids"].append([[t] for t in tokens])
        return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return testing.save_tiny_model(tmp_path_factory.mktemp("grpo_vllm") / "llama", arch="llama", seed=3)


def policy(path, load_in_4bit):
    """A loraforge LoRA model whose adapters are not zero (so the merged weights differ from the base)."""
    model, tokenizer = FastLanguageModel.from_pretrained(path, dtype=torch.float32, load_in_4bit=load_in_4bit)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    g = torch.Generator().manual_seed(11)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=g) * 0.05
    return model, tokenizer


def merged_weights(model) -> dict[str, torch.Tensor]:
    """base + scale * B @ A per adapted projection, under the plain transformers name, computed here from
    the PEFT modules (16-bit bases)."""
    merged = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            base = module.get_base_layer().weight.detach()
            delta = module.lora_B["default"].weight.detach() @ module.lora_A["default"].weight.detach()
            plain = name.removeprefix("base_model.model.")
            merged[f"{plain}.weight"] = base + module.scaling["default"] * delta
    return merged


def vllm_trainer(model, tokenizer, tmp_path, monkeypatch, server, **config):
    monkeypatch.setattr(vllm_generation, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(vllm_generation, "VLLMClient", server)
    config = {"per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 5,
              "report_to": [], "use_cpu": True, "bf16": False, "save_strategy": "no", "disable_tqdm": True,
              "logging_steps": 1, "use_vllm": True, "vllm_mode": "server", "beta": 0.0, "learning_rate": 1e-2,
              "temperature": 0.7, **config}  # fmt: skip
    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), **config)
    topics = ["cats", "rain", "bread", "trains"]
    data = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Tell me about {t}."}]
                                                  for t in topics * 2]})  # fmt: skip
    # fast_generation=True asks for our rollouts even on CPU: vLLM mode must still win.
    monkeypatch.setattr(grpo, "generate_through_fast_generate", _no_fast_generate)
    return grpo.GRPOTrainer(model=model, reward_funcs=[completion_length], args=args, train_dataset=data,
                            processing_class=tokenizer, fast_generation=True)  # fmt: skip


def completion_length(completions, **kwargs):
    """Characters of text (conversational completions are [{"role": ..., "content": ...}])."""
    return [float(len(c[0]["content"] if isinstance(c, list) else c)) for c in completions]


def _no_fast_generate(model):
    raise AssertionError("vLLM mode rolled out through fast_generate")


def test_vllm_server_mode_pushes_the_merged_policy_and_trains(model_dir, tmp_path, monkeypatch):
    model, tokenizer = policy(model_dir, load_in_4bit=False)
    expected = merged_weights(model)
    bases = {name: module.get_base_layer().weight.detach().clone()
             for name, module in model.named_modules() if hasattr(module, "lora_A")}  # fmt: skip
    server = StandInServer(model_dir, tokenizer.eos_token_id)
    trainer = vllm_trainer(model, tokenizer, tmp_path, monkeypatch, server, max_steps=2)
    trainer.train()

    assert server.generate_calls >= 2 and len(server.pushed) == 2  # a sync before each step's rollout
    first = server.pushed[0]
    # Plain transformers names, no PEFT pieces, every parameter of the model once.
    assert not any("lora" in name or "base_layer" in name or "base_model" in name for name in first)
    assert set(first) == {name for name, _ in server.model.named_parameters()}
    # The first sync (before any optimizer step) is base + scale * B @ A of the starting adapters.
    for name, weight in expected.items():
        torch.testing.assert_close(first[name], weight, rtol=1e-6, atol=1e-6)
    # Unmerged afterwards: the bases hold their own values again (to fp32 rounding of W + d - d).
    for name, module in model.named_modules():
        if name in bases:
            torch.testing.assert_close(module.get_base_layer().weight.detach(), bases[name], rtol=0, atol=1e-6)
    # The second sync carries the trained adapters: it differs from the first where LoRA is attached.
    assert any(not torch.equal(server.pushed[1][name], first[name]) for name in expected)

    # The policy scored the server's completions with the server's own numbers: the pushed weights are
    # the policy, and our fused path was not left stale by merge/unmerge.
    logged = [entry for entry in trainer.state.log_history if "sampling/sampling_logp_difference/max" in entry]
    assert len(logged) == 2
    for entry in logged:
        assert entry["sampling/sampling_logp_difference/max"] < 1e-4, entry
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in trainer.state.log_history if "loss" in entry)


def test_vllm_server_mode_trains_a_4bit_model(model_dir, tmp_path, monkeypatch):
    """QLoRA through TRL's vLLM mode: TRL pushes what PEFT's merge leaves in the 4-bit base (bitsandbytes
    codes re-quantized with the adapters folded in, as with any PEFT QLoRA model); our trainer runs
    through it and the step trains."""
    model, tokenizer = policy(model_dir, load_in_4bit=True)
    server = StandInServer(model_dir, tokenizer.eos_token_id)
    trainer = vllm_trainer(model, tokenizer, tmp_path, monkeypatch, server, max_steps=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    assert server.generate_calls >= 1 and len(server.pushed) == 1
    names = set(server.pushed[0])
    assert not any("lora" in name or "base_layer" in name for name in names)
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.0.mlp.down_proj.weight" in names
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n].detach(), b) for n, b in before.items())  # the adapters trained
