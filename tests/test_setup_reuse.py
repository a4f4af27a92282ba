"""Set-up that reuses what was built: derived variants, the reference on disk, the set-up split."""

from __future__ import annotations

import pytest
import torch

from runners.contract import TrialConfig
from runners.glm.compress import apply_quantization, apply_sparsity
from runners.glm.model import build_model
from runners.glm.model_cache import BASES, MODELS, REFERENCES, derive_model, keep_weights, reference_path
from runners.infer import GlmInferRunner, base_model
from runners.knobs import INFER_KNOBS

SPEC = {"preset": "glm-tiny"}


def _compressed(model, **knobs):
    knobs = {"sparsity": 0.0, "sparsity_kind": "unstructured", "quant_bits": 16, "quant_scheme": "weight_only",
             "quant_kernel": "torchao", **knobs}
    apply_sparsity(model, knobs, "cpu")
    apply_quantization(model, knobs, "cpu")
    return model


def _weights(model):
    # torchao int8 weights are tensor subclasses: compare what they dequantise to.
    out = {}
    for name, tensor in model.state_dict().items():
        out[name] = tensor.dequantize() if hasattr(tensor, "dequantize") and tensor.dtype.is_floating_point \
            and type(tensor) is not torch.Tensor else tensor
    return out


def _assert_same(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_two_variants_from_one_base_equal_two_fresh_builds():
    base = build_model(SPEC, torch.float32, "cpu", 0)
    kept = keep_weights(base)
    pruned = _compressed(derive_model(kept, "cpu"), sparsity=0.5)
    int8 = _compressed(derive_model(kept, "cpu"), quant_bits=8)
    _assert_same(pruned, _compressed(build_model(SPEC, torch.float32, "cpu", 0), sparsity=0.5))
    _assert_same(int8, _compressed(build_model(SPEC, torch.float32, "cpu", 0), quant_bits=8))
    assert type(int8.model.layers[0].mlp.down_proj.weight) is not torch.nn.Parameter  # torchao int8 tensor
    assert float((pruned.model.layers[0].mlp.down_proj.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    # compressing a variant in place left the kept base (and the other variant) untouched
    _assert_same(derive_model(kept, "cpu"), build_model(SPEC, torch.float32, "cpu", 0))
    ids = torch.randint(3, 100, (2, 12))
    assert torch.equal(derive_model(kept, "cpu")(ids).logits, base(ids).logits)


def test_tied_weights_stay_tied_and_a_base_over_budget_is_not_kept():
    base = build_model(SPEC, torch.float32, "cpu", 0)
    base.lm_head.weight = base.model.embed_tokens.weight  # tie them, as tied checkpoints are
    kept = keep_weights(base)
    assert kept.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    derived = derive_model(kept, "cpu")
    assert derived.lm_head.weight is derived.model.embed_tokens.weight
    assert keep_weights(base, budget_bytes=kept.nbytes - 1) is None


def test_base_model_is_built_once_then_derived():
    BASES.clear()
    _, first = base_model(SPEC, torch.float32, "cpu", 0, "sdpa")
    _, second = base_model(SPEC, torch.float32, "cpu", 0, "sdpa")
    _, other_seed = base_model(SPEC, torch.float32, "cpu", 1, "sdpa")
    assert (first, second, other_seed) == ("built", "derived", "built")


def _config(tmp_path, eval_sequences=2, **knobs):
    all_knobs = {name: knob.default for name, knob in INFER_KNOBS.items()}
    all_knobs.update(knobs)
    workload = {"arrival": "closed", "concurrency": 2, "requests": 4, "warmup_requests": 1,
                "prompt_tokens": 8, "output_tokens": 3, "eval_sequences": eval_sequences, "eval_tokens": 16}
    return TrialConfig("glm-infer", dict(SPEC), "cpu", workload, all_knobs, artifact_dir=str(tmp_path / "t"))


def test_trials_split_setup_and_read_the_reference_from_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOGLM_CACHE_DIR", str(tmp_path / "cache"))
    for cache in (BASES, MODELS, REFERENCES):
        cache.clear()
    runner = GlmInferRunner()
    first = runner.run(_config(tmp_path))
    phases = ("setup_build_s", "setup_compress_s", "setup_compile_s", "setup_quality_s")
    assert all(first.metrics[p] >= 0 for p in phases)
    assert sum(first.metrics[p] for p in phases) <= first.metrics["setup_s"] + 1e-6
    assert first.info["base_model"] == "built"
    stored = list((tmp_path / "cache" / "reference").glob("*.pt"))
    assert len(stored) == 1

    # A new process (caches in memory gone) with another variant: base built, reference read back.
    for cache in (BASES, MODELS, REFERENCES):
        cache.clear()
    monkeypatch.setattr("runners.infer.log_probs", _refuse)
    with pytest.raises(AssertionError, match="reference recomputed"):
        runner.run(_config(tmp_path, sparsity=0.25, eval_sequences=3))  # another eval set: a miss
    for cache in (BASES, MODELS, REFERENCES):
        cache.clear()
    second = runner.run(_config(tmp_path, sparsity=0.25))
    assert second.metrics["kl_divergence"] > 0  # measured against the stored reference
    assert second.info["base_model"] == "built"


def _refuse(*args, **kwargs):
    raise AssertionError("reference recomputed although it is on disk")


def test_reference_path_needs_a_cache_dir(monkeypatch):
    monkeypatch.delenv("AUTOGLM_CACHE_DIR", raising=False)
    assert reference_path("any") is None


def test_nvrtc_images_are_compiled_once_per_key(tmp_path):
    from runners.glm.kernels.kernel_cache import cached_image, image_key

    compiles = []

    def compile_image():
        compiles.append(1)
        return b"\x7fELF image", "_Z6kernelv"

    key = image_key("__global__ void kernel() {}", "kernel", ["-std=c++17"], "90", "torch 2.11 cuda 13.0")
    assert cached_image(tmp_path, key, compile_image) == (b"\x7fELF image", "_Z6kernelv")
    assert cached_image(tmp_path, key, compile_image) == (b"\x7fELF image", "_Z6kernelv")  # read back
    assert len(compiles) == 1
    assert key != image_key("__global__ void kernel() {}", "kernel", ["-std=c++17"], "89", "torch 2.11 cuda 13.0")
