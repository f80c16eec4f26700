"""TRL's vLLM modes with loraforge models (issue 7: "TRL's vLLM mode keeps working where vLLM is installed").

vLLM itself needs a GPU and cannot be installed here, so it is stood in for where TRL meets it: the
`VLLMClient` of server mode, and the `vllm.LLM` / `SamplingParams` of colocate mode (TRL's default).
Behind both is a plain transformers model loaded from the same checkpoint, which takes the weights TRL
pushes (by the names vLLM loads them under, as vLLM's `load_weights` does) and samples from them,
reporting the sampled tokens' log-probabilities as vLLM does with `logprobs_mode="processed_logprobs"`.
Everything on the trainer's side is TRL's own code: the weight sync (PEFT's merge_adapter, the walk
over the parameters, unmerge_adapter), the requests, the importance-sampling correction. What this
checks about loraforge:

* our GRPOTrainer leaves rollouts to vLLM (fast_generate is not used), and training runs through it;
* the weights pushed are the merged policy (base + scale * B @ A) under their plain transformers names,
  even though our patched forwards cache views of the base weights and the adapters;
* after the sync the adapters are unmerged and our fused path scores as before: the policy's
  log-probabilities equal the engine's (TRL's `sampling_logp_difference` metric), which fails if the
  pushed weights are not the policy or if merge/unmerge left a stale cache behind;
* 4-bit models train through both modes (colocate starts vLLM with quantization="bitsandbytes").
"""

import os
import types

import pytest
import torch

from loraforge import FastLanguageModel, testing

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
grpo = pytest.importorskip("loraforge.train.grpo")
vllm_generation = pytest.importorskip("trl.generation.vllm_generation")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see tests/conftest.py



class StandInEngine:
    """The model behind both stand-ins: a plain transformers model from the checkpoint, which takes
    weights by the names vLLM loads them under and samples (seeded), reporting each token's
    log-probability under the temperature-scaled distribution, as vLLM does in processed_logprobs mode."""

    def __init__(self, path, eos_token_id):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.eos_token_id = eos_token_id
        self.pushed: list[dict[str, torch.Tensor]] = []  # one dict per sync
        self.generate_calls = 0
        self.generator = torch.Generator().manual_seed(0)

    def load(self, named_tensors) -> dict[str, torch.Tensor]:
        received = {name: tensor.detach().clone() for name, tensor in named_tensors}
        parameters = dict(self.model.named_parameters())
        for name, tensor in received.items():
            if name in parameters and parameters[name].shape == tensor.shape and tensor.is_floating_point():
                parameters[name].data.copy_(tensor)
        return received

    @torch.no_grad()
    def sample(self, prompt, temperature, max_tokens) -> tuple[list[int], list[float]]:
        ids = torch.tensor([list(prompt)])
        tokens, logprobs = [], []
        for _ in range(max_tokens):
            logp = torch.log_softmax(self.model(ids).logits[0, -1].float() / temperature, -1)
            token = int(torch.multinomial(logp.exp(), 1, generator=self.generator))
            tokens.append(token)
            logprobs.append(float(logp[token]))
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
            if token == self.eos_token_id:
                break
        return tokens, logprobs


class StandInServer(StandInEngine):
    """What TRL's VLLMClient talks to (server mode), for one process."""

    def __call__(self, *args, **kwargs):  # stands in for the VLLMClient class: "constructing" returns self
        return self

    def init_communicator(self, device=None):
        pass

    def get_server_info(self):
        return {"model_config": {"logprobs_mode": "processed_logprobs"}}

    def reset_prefix_cache(self):
        pass

    def update_named_params(self, metadata, named_tensors):
        def checked():
            for (name, dtype, shape), (tensor_name, tensor) in zip(metadata, named_tensors, strict=True):
                assert name == tensor_name and list(tensor.shape) == shape and str(tensor.dtype) == f"torch.{dtype}"
                yield name, tensor

        self.pushed.append(self.load(checked()))

    def generate(self, prompts, n=1, temperature=1.0, max_tokens=16, **kwargs):
        self.generate_calls += 1
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "logprob_token_ids": []}
        for prompt in prompts:
            for _ in range(n):
                tokens, logprobs = self.sample(prompt, temperature, max_tokens)
                out["prompt_ids"].append(list(prompt))
                out["completion_ids"].append(tokens)
                out["logprobs"].append([[lp] for lp in logprobs])
                out["logprob_token_ids"].append([[t] for t in tokens])
        return out


class StandInLLM(StandInEngine):
    """vllm.LLM in TRL's colocate mode: TRL builds one (the class is stood in by a factory returning this
    object, with the arguments recorded), pushes weights one by one through
    llm_engine.model_executor.driver_worker.model_runner.model.load_weights, and generates with
    SamplingParams, reading RequestOutput objects."""

    def __init__(self, path, eos_token_id):
        super().__init__(path, eos_token_id)
        self.init_kwargs = None
        self.sync_buffer: dict[str, torch.Tensor] = {}
        runner = types.SimpleNamespace(model=types.SimpleNamespace(load_weights=self._load_weights))
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
            driver_worker=types.SimpleNamespace(model_runner=runner)))  # fmt: skip

    def factory(self, **kwargs):
        self.init_kwargs = kwargs
        return self

    def _load_weights(self, pairs):
        self.sync_buffer.update(self.load(pairs))

    def reset_prefix_cache(self):  # TRL calls it once a sync is complete
        self.pushed.append(dict(self.sync_buffer))
        self.sync_buffer.clear()

    def generate(self, prompts, sampling_params, use_tqdm=False):
        self.generate_calls += 1
        settings = sampling_params.kwargs
        outputs = []
        for prompt in prompts:
            ids = prompt["prompt_token_ids"]
            completions = []
            for _ in range(settings.get("n", 1)):
                tokens, logprobs = self.sample(ids, settings.get("temperature", 1.0), settings["max_tokens"])
                per_token = [{t: types.SimpleNamespace(logprob=lp, rank=1)} for t, lp in zip(tokens, logprobs)]
                completions.append(types.SimpleNamespace(token_ids=tokens, logprobs=per_token))
            outputs.append(types.SimpleNamespace(prompt_token_ids=list(ids), outputs=completions))
        return outputs


class StandInSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


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


def stand_in(mode: str, path, tokenizer, monkeypatch):
    """The stand-in engine for TRL's vLLM `mode`, installed where TRL looks for vLLM."""
    monkeypatch.setattr(vllm_generation, "is_vllm_available", lambda *a, **k: True)
    if mode == "server":
        engine = StandInServer(path, tokenizer.eos_token_id)
        monkeypatch.setattr(vllm_generation, "VLLMClient", engine)
        return engine
    engine = StandInLLM(path, tokenizer.eos_token_id)
    monkeypatch.setattr(vllm_generation, "LLM", engine.factory, raising=False)
    monkeypatch.setattr(vllm_generation, "SamplingParams", StandInSamplingParams, raising=False)
    # Colocate mode writes the launcher's variables for vLLM; these restore them afterwards.
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, os.environ.get(name, "0"))
        monkeypatch.delenv(name)
    return engine


def vllm_trainer(model, tokenizer, tmp_path, monkeypatch, mode="server", **config):
    config = {"per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 5,
              "report_to": [], "use_cpu": True, "bf16": False, "save_strategy": "no", "disable_tqdm": True,
              "logging_steps": 1, "use_vllm": True, "vllm_mode": mode, "beta": 0.0, "learning_rate": 1e-2,
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


@pytest.mark.parametrize("mode", ["server", "colocate"])
def test_vllm_mode_pushes_the_merged_policy_and_trains(model_dir, tmp_path, monkeypatch, mode):
    model, tokenizer = policy(model_dir, load_in_4bit=False)
    expected = merged_weights(model)
    bases = {name: module.get_base_layer().weight.detach().clone()
             for name, module in model.named_modules() if hasattr(module, "lora_A")}  # fmt: skip
    server = stand_in(mode, model_dir, tokenizer, monkeypatch)
    trainer = vllm_trainer(model, tokenizer, tmp_path, monkeypatch, mode, max_steps=2)
    trainer.train()
    if mode == "colocate":  # TRL built its LLM from the model's own checkpoint, in 16 bits
        assert server.init_kwargs["model"] == str(model_dir) and server.init_kwargs["quantization"] is None

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


@pytest.mark.parametrize("mode", ["server", "colocate"])
def test_vllm_mode_trains_a_4bit_model(model_dir, tmp_path, monkeypatch, mode):
    """QLoRA through TRL's vLLM modes: TRL pushes what PEFT's merge leaves in the 4-bit base (bitsandbytes
    codes re-quantized with the adapters folded in, as with any PEFT QLoRA model; colocate mode starts
    vLLM with quantization="bitsandbytes" for it); our trainer runs through it and the step trains."""
    model, tokenizer = policy(model_dir, load_in_4bit=True)
    server = stand_in(mode, model_dir, tokenizer, monkeypatch)
    trainer = vllm_trainer(model, tokenizer, tmp_path, monkeypatch, mode, max_steps=1)
    if mode == "colocate":
        assert server.init_kwargs["quantization"] == "bitsandbytes"
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    assert server.generate_calls >= 1 and len(server.pushed) == 1
    names = set(server.pushed[0])
    assert not any("lora" in name or "base_layer" in name for name in names)
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.0.mlp.down_proj.weight" in names
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n].detach(), b) for n, b in before.items())  # the adapters trained
