"""Packed int8/int4 weight-only layers (`quant_kernel: triton | cuda`): the packing matches
torchao's affine quantisation, the fast decode path dispatches to them, sizes and quality are
what the bits say, the fused norm/residual form equals the ops in sequence. The Triton and CUDA
kernels themselves run in the `gpu` tests, against the dequantised weight."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

from runners.contract import InfeasibleConfig
from runners.glm import woq
from runners.glm.compress import apply_quantization, linear_layers
from runners.glm.engines.fast import FastEngine
from runners.glm.engines.hf import HFEngine
from runners.glm.fast_model import FastGlm
from runners.glm.model import build_model, model_info
from runners.glm.quality import eval_batch, fidelity, log_probs

TINY = {"preset": "glm-tiny"}


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return build_model(TINY, torch.float32, "cpu", seed=0)


def _rel_err(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.float() - exact.float()).norm() / exact.float().norm())


# --- packing ------------------------------------------------------------------------------------
def test_int4_nibbles_unpack_to_torchao_values_in_feature_order():
    torch.manual_seed(0)
    weight = torch.randn(6, 256)
    packed = woq.quantize_int4(weight, 64)
    scale, zero = choose_qparams_affine(weight, MappingType.ASYMMETRIC, (1, 64), torch.uint8, quant_min=0,
                                        quant_max=15, scale_dtype=weight.dtype)
    expected = quantize_affine(weight, (1, 64), scale, zero, torch.uint8, 0, 15)
    assert packed.packed.shape == (6, 128) and packed.packed.dtype == torch.uint8
    assert torch.equal(woq.unpack_int4(packed.packed, 4), expected)
    # Byte j of a group: element j low, element j + G/2 high.
    assert int(packed.packed[0, 0]) == int(expected[0, 0]) | (int(expected[0, 32]) << 4)


@pytest.mark.parametrize(("bits", "bound"), [(8, 0.01), (4, 0.12)])
def test_dequantised_weight_error_is_what_the_bits_allow(bits, bound):
    torch.manual_seed(0)
    weight = torch.randn(64, 512)
    packed = woq.quantize_int8(weight) if bits == 8 else woq.quantize_int4(weight, 128)
    err = _rel_err(woq.dequantize(packed, torch.float32), weight)
    # Uniform quantisation of a Gaussian: int8 ~0.7 %, int4 (groups of 128) ~10 % relative error.
    assert bound / 3 < err < bound


def test_int4_smaller_groups_quantise_more_finely():
    torch.manual_seed(0)
    weight = torch.randn(32, 512)
    errs = [_rel_err(woq.dequantize(woq.quantize_int4(weight, g), torch.float32), weight) for g in (32, 128, 256)]
    assert errs[0] < errs[1] < errs[2]


def test_int4_group_size_must_divide_the_inputs():
    with pytest.raises(ValueError, match="divide"):
        woq.quantize_int4(torch.randn(4, 96), 64)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
def test_packed_linear_matches_its_dequantised_dense_twin(bits, gated):
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 48, bias=True)
    packed = woq.PackedLinear(layer, bits, 64, gated=gated)
    x = torch.randn(3, 5, 256)
    dense = F.linear(x, woq.dequantize(packed.weight, torch.float32), layer.bias)
    assert torch.allclose(packed(x), dense, atol=1e-5)
    assert packed(x).shape == (3, 5, 48)
    # gated storage holds the same quantised rows, interleaved gate/up; dequantize undoes that
    plain = woq.dequantize(woq.PackedLinear(layer, bits, 64).weight, torch.float32)
    assert torch.equal(woq.dequantize(packed.weight, torch.float32), plain)
    swiglu = woq.linear(x, packed.weight, swiglu=True)
    assert torch.allclose(swiglu, woq.swiglu_apart(F.linear(x, plain)), atol=1e-5)
    assert swiglu.shape == (3, 5, 24)


# --- sizes and dispatch in the fast path --------------------------------------------------------
def _packed_copy(model: torch.nn.Module, bits: int, head: bool = False, gemv: str = "triton") -> FastGlm:
    fast = FastGlm(copy.deepcopy(model))
    woq.pack_linears(fast, linear_layers(fast, head), bits, 32, gemv)
    return fast


def _dequantised_twin(packed_model: torch.nn.Module) -> torch.nn.Module:
    """The same model with every packed layer replaced by a dense Linear of its dequantised weight."""
    twin = copy.deepcopy(packed_model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, woq.PackedLinear):
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight = torch.nn.Parameter(woq.dequantize(module.weight, twin.dtype), requires_grad=False)
            dense.bias = module.bias
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, child, dense)
    return twin


@pytest.mark.parametrize("gemv", woq.GEMV_KERNELS)
@pytest.mark.parametrize("bits", [8, 4])
def test_fast_path_with_packed_layers_decodes_like_the_dequantised_model(tiny, bits, gemv):
    # gemv=cuda stores the MLP's gate_up gated (interleaved pairs): on CPU its ops' own path runs
    packed = _packed_copy(tiny, bits, head=True, gemv=gemv)
    assert len(woq.packed_linears(packed)) == 4 * tiny.config.num_hidden_layers + 1
    gated = [layer.gated for layer in woq.packed_linears(packed)]
    assert sum(gated) == (tiny.config.num_hidden_layers if gemv == "cuda" else 0)
    twin = _dequantised_twin(packed)
    prompts = [[5, 6, 7, 8, 9, 10], [40, 41, 42]]
    got = torch.cat(list(FastEngine(packed, "cpu", compile_step=False).decode(prompts, 8)), dim=1)
    want = torch.cat(list(FastEngine(twin, "cpu", compile_step=False).decode(prompts, 8)), dim=1)
    assert torch.equal(got, want)


def test_transformers_model_runs_with_packed_layers_in_its_own_loop(tiny):
    # kv_cache dynamic/offloaded/quantized run transformers' own modules: PackedLinear replaces
    # nn.Linear there too.
    packed = copy.deepcopy(tiny)
    woq.pack_linears(packed, linear_layers(packed, include_lm_head=False), 8, 32)
    twin = _dequantised_twin(packed)
    prompts = [[5, 6, 7, 8, 9, 10], [40, 41, 42]]
    got = torch.cat(list(HFEngine(packed, "cpu", "dynamic", 4, lambda r: []).decode(prompts, 6)), dim=1)
    want = torch.cat(list(HFEngine(twin, "cpu", "dynamic", 4, lambda r: []).decode(prompts, 6)), dim=1)
    assert torch.equal(got, want)


def test_model_info_counts_packed_bytes_and_logical_params(tiny):
    before = model_info(FastGlm(copy.deepcopy(tiny)))
    int8, int4 = model_info(_packed_copy(tiny, 8)), model_info(_packed_copy(tiny, 4))
    fast = FastGlm(copy.deepcopy(tiny))
    dense = sum(m.weight.numel() for _, m in linear_layers(fast, include_lm_head=False))
    rows = sum(m.out_features for _, m in linear_layers(fast, include_lm_head=False))
    assert int8.params == int4.params == before.params
    # float32 -> 1 byte + a float32 scale per row; -> half a byte + two float32 per 32-group.
    assert before.decode_weight_bytes - int8.decode_weight_bytes == 3 * dense - 4 * rows
    assert before.decode_weight_bytes - int4.decode_weight_bytes == int(3.5 * dense) - 8 * dense // 32


def test_packed_kl_orders_4_bit_above_8_bit_above_16_bit(tiny):
    ids = eval_batch(tiny.config.vocab_size, 4, 32, seed=0, device="cpu")
    reference = log_probs(tiny, ids)

    def kl(model: FastGlm) -> float:
        engine = FastEngine(model, "cpu", compile_step=False)
        return fidelity(reference, engine.teacher_forced_log_probs(ids, 16)).kl_divergence

    full, eight, four = kl(FastGlm(copy.deepcopy(tiny))), kl(_packed_copy(tiny, 8)), kl(_packed_copy(tiny, 4))
    assert full < 1e-6 < eight < four


@pytest.mark.parametrize("bits", [8, 4])
def test_packed_op_with_norm_and_residual_is_the_ops_in_sequence(bits):
    # The ops' own path (taken where the CUDA GEMV cannot run) for the fused forms.
    torch.manual_seed(0)
    weight = torch.randn(48, 256) * 0.05
    packed = (woq.quantize_int8(weight) if bits == 8 else woq.quantize_int4(weight, 64))._replace(gemv="cuda")
    x, norm, residual = torch.randn(1, 1, 256), torch.rand(256) + 0.5, torch.randn(1, 1, 48)
    op = torch.ops.autoglm.int8_linear if bits == 8 else torch.ops.autoglm.int4_linear
    got = op(x, *packed, norm, 1e-5, residual)
    want = residual + woq.linear(woq.rms_norm(x, norm, 1e-5), packed._replace(gemv="triton"))
    assert torch.allclose(got, want, atol=1e-6)
    # `linear` routes a CPU row to the unfused ops: the same numbers
    assert torch.allclose(woq.linear(x, packed, norm=norm, eps=1e-5, residual=residual), want, atol=1e-6)
    # SwiGLU of the output, from a gated weight (pairs interleaved) or a plain one
    gated = woq.PackedLinear(torch.nn.Linear(256, 48, bias=False), bits, 64, "cuda", gated=True).weight
    want = woq.swiglu_apart(F.linear(woq.rms_norm(x, norm, 1e-5), woq.dequantize(gated, torch.float32)))
    assert torch.allclose(op(x, *gated, norm, 1e-5, None, True), want, atol=1e-6)
    assert torch.allclose(woq.linear(x, gated, norm=norm, eps=1e-5, swiglu=True), want, atol=1e-6)
    # without SwiGLU the op answers in stored (pair) order, `linear` in [gate | up] order
    stored = F.linear(x, woq.dequantize(gated._replace(gated=False), torch.float32))
    assert torch.allclose(op(x, *gated), stored, atol=1e-6)
    assert torch.allclose(woq.linear(x, gated), woq.gate_up_order(stored), atol=1e-6)
    plain = gated._replace(gated=False, gemv="triton")
    assert torch.allclose(woq.linear(x, plain, swiglu=True),
                          woq.swiglu_apart(F.linear(x, woq.dequantize(plain, torch.float32))), atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        woq.linear(x, gated, residual=residual, swiglu=True)


@pytest.mark.parametrize(("knobs", "reason"), [
    ({"quant_bits": 8, "quant_kernel": "triton"}, "not on CPU"),
    ({"quant_bits": 4, "quant_kernel": "triton"}, "not on CPU"),
    ({"quant_bits": 8, "quant_kernel": "triton", "quant_scheme": "dynamic_activation"}, "weight-only"),
    ({"quant_bits": 8, "quant_kernel": "cuda"}, "not on CPU"),
    ({"quant_bits": 4, "quant_kernel": "cuda", "quant_scheme": "dynamic_activation"}, "weight-only"),
])
def test_packed_kernel_knob_is_infeasible_where_it_cannot_run(tiny, knobs, reason):
    with pytest.raises(InfeasibleConfig, match=reason):
        apply_quantization(FastGlm(copy.deepcopy(tiny)), knobs, "cpu")


# --- GPU: the Triton and CUDA kernels -----------------------------------------------------------------
gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("gemv", woq.GEMV_KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, 32, 200])
@pytest.mark.parametrize(("out_features", "in_features"), [(4608, 4096), (4096, 13696), (200, 384)])
def test_gpu_kernels_match_the_dequantised_matmul(gemv, dtype, bits, rows, out_features, in_features):
    if dtype == torch.float16 and rows not in (1, 3):
        pytest.skip("fp16 covers the GEMV and one matmul row count")
    torch.manual_seed(0)
    group = 128 if in_features % 128 == 0 else 64
    weight = torch.randn(out_features, in_features, device="cuda", dtype=dtype) * 0.02
    packed = (woq.quantize_int8(weight) if bits == 8 else woq.quantize_int4(weight, group))._replace(gemv=gemv)
    x = torch.randn(rows, in_features, device="cuda", dtype=dtype)
    got = woq.linear(x, packed)
    want = F.linear(x.float(), woq.dequantize(packed, torch.float32))
    assert got.dtype == dtype and got.shape == (rows, out_features)
    # bf16 output rounding (2^-8 relative) plus fp32 accumulation-order differences.
    assert _rel_err(got, want) < 5e-3


@gpu
@pytest.mark.parametrize("fusion", ["none", "norm+residual", "norm+swiglu"])
@pytest.mark.parametrize("bits", [8, 4])
def test_gpu_every_cuda_gemv_variant_matches_the_reference(bits, fusion):
    from runners.glm.kernels import woq_cuda

    torch.manual_seed(0)
    out_features, in_features = 1000, 2560  # rows not a multiple of any block, K a multiple of 512
    layer = torch.nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=torch.bfloat16)
    packed = woq.PackedLinear(layer, bits, 128, "cuda", gated=fusion == "norm+swiglu").weight
    x = torch.randn(1, in_features, device="cuda", dtype=torch.bfloat16)
    norm = torch.rand(in_features, device="cuda", dtype=torch.bfloat16) + 0.5
    residual = torch.randn(1, out_features, device="cuda", dtype=torch.bfloat16)
    x_in = x.float() if fusion == "none" else woq.rms_norm(x, norm, 1e-5).float()
    want = F.linear(x_in, woq.dequantize(packed, torch.float32))
    fused = {"none": woq_cuda.Fusion(), "norm+residual": woq_cuda.Fusion(norm, 1e-5, residual),
             "norm+swiglu": woq_cuda.Fusion(norm, 1e-5, gated=True)}[fusion]
    want = {"none": want, "norm+residual": want + residual.float(), "norm+swiglu": woq.swiglu_apart(want)}[fusion]
    variants = woq_cuda.INT8_VARIANTS if bits == 8 else woq_cuda.INT4_VARIANTS
    gemv = woq_cuda.int8_gemv if bits == 8 else woq_cuda.int4_gemv
    for variant in variants:
        if fused.gated and variant.rows % 2:
            continue  # not offered for gated weights (a pair must stay in one warp)
        got = gemv(x, *packed.tensors(), fused, variant=variant)
        assert _rel_err(got, want) < 5e-3, variant


@gpu
@pytest.mark.parametrize("pdl", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_gpu_cuda_gemv_chain_in_a_graph_reads_each_new_input(bits, pdl, monkeypatch):
    # Captured GEMVs launch with programmatic dependent launch: each starts before the previous
    # one ends and may read only weights until it waits. A chain where every GEMV reads the last
    # one's output, replayed with new inputs, gives stale (previous replay's) values if a kernel
    # read its activations too early.
    from runners.glm.kernels import cuda_launch

    monkeypatch.setattr(cuda_launch, "use_pdl", pdl)
    torch.manual_seed(0)
    size = 2048
    weights = [torch.randn(size, size, device="cuda", dtype=torch.bfloat16) / size**0.5 for _ in range(6)]
    packed = [(woq.quantize_int8(w) if bits == 8 else woq.quantize_int4(w, 128))._replace(gemv="cuda")
              for w in weights]
    norm = torch.rand(size, device="cuda", dtype=torch.bfloat16) + 0.5
    x = torch.randn(1, size, device="cuda", dtype=torch.bfloat16)

    def chain() -> torch.Tensor:
        h = x
        for i, weight in enumerate(packed):
            h = woq.linear(h, weight, norm=norm, eps=1e-5) if i % 2 else woq.linear(h, weight, residual=h)
        return h

    expected = []
    for _ in range(3):  # plain launches outside a capture: the reference, and variants tuned
        x.normal_()
        expected.append((x.clone(), chain().float()))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for value, want in expected * 2:
        x.copy_(value)
        graph.replay()
        assert _rel_err(out, want) < 1e-3


@gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_gpu_cuda_gemv_takes_unaligned_rows_through_the_triton_kernel(bits):
    # A row view 2 bytes into its storage cannot be read in 16-byte chunks: the op must not
    # hand it to the CUDA GEMV (woq_cuda.can_run) yet still answer correctly.
    torch.manual_seed(0)
    weight = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    packed = (woq.quantize_int8(weight) if bits == 8 else woq.quantize_int4(weight, 128))._replace(gemv="cuda")
    x = torch.randn(4096 + 1, device="cuda", dtype=torch.bfloat16)[1:].view(1, 4096)
    assert x.data_ptr() % 16 != 0
    want = F.linear(x.float(), woq.dequantize(packed, torch.float32))
    assert _rel_err(woq.linear(x, packed), want) < 5e-3


@gpu
@pytest.mark.parametrize("kernel", ["triton", "cuda"])
@pytest.mark.parametrize("bits", [8, 4])
def test_gpu_compiled_fast_path_with_packed_kernels_follows_the_dequantised_model(bits, kernel):
    model = FastGlm(build_model(TINY, torch.bfloat16, "cuda:0", seed=0))
    apply_quantization(model, {"quant_bits": bits, "quant_kernel": kernel, "quantize_lm_head": True,
                               "quant_group_size": 32}, "cuda:0")
    assert {layer.gemv for layer in woq.packed_linears(model)} == {kernel}
    assert len(woq.packed_linears(model)) == 4 * model.config.num_hidden_layers + 1
    ids = eval_batch(model.config.vocab_size, 2, 24, seed=0, device="cuda:0")
    compiled = FastEngine(model, "cuda:0", compile_step=True)
    got = compiled.teacher_forced_log_probs(ids, 12)
    assert compiled.compiled and not compiled.compile_error
    reference = FastEngine(_dequantised_twin(model), "cuda:0", compile_step=False).teacher_forced_log_probs(ids, 12)
    quality = fidelity(reference.cpu(), got.cpu())
    assert quality.top1_agreement >= 0.9 and quality.kl_divergence < 0.05
