"""Weight-only int8 / int4 Linear layers with our own kernels (`quant_kernel: triton | cuda`).

Why not only torchao: on the H200 image (torch 2.11, torchao 0.18, no `mslk`/fbgemm-genai) the
batch-1 decode kernels torchao reaches read weights far below the memory bandwidth: Inductor's
fused int8 dequant reduction 2.2-3.2 TB/s, tinygemm int4 ~1.7 TB/s, against a 4.2 TB/s copy
(benchmarks/NOTES-issue3.md, run 2). Decode at batch 1 is pure weight streaming, so that gap is
the whole int8/int4 speed-up. torchao still does the quantisation arithmetic here
(`choose_qparams_affine` / `quantize_affine`); what is ours is the storage layout and the
kernels that read it: `woq_triton.py` (GEMV and matmul) and, for one activation row with
`quant_kernel: cuda`, the hand-written CUDA GEMVs of `woq_cuda.py`.

Layouts (both row-major over output features N, input features K):
- int8: `qdata` [N, K] int8, symmetric per output row; `scale` [N] float32. w = q * scale.
- int4: `packed` [N, K/2] uint8, asymmetric per group of G input features; `scale`, `zero`
  [N, K/G] in the activation dtype. Within a group, byte j holds element j in its low nibble
  and element j + G/2 in its high nibble, so a kernel multiplies each nibble plane by a
  contiguous half of the activation group (no interleaved loads). w = (q - zero) * scale.
- `gated` (either bits; the MLP's gate_up with `quant_kernel: cuda`): rows stored as interleaved
  gate/up pairs, so the CUDA GEMV can write silu(gate) * up itself; `dequantize` and `linear`
  answer in the usual [gate | up] order.

On CUDA with bf16/fp16 activations the ops run those kernels; elsewhere (CPU, float32) they
dequantise and call `F.linear`, the same arithmetic, used as the tests' reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runners.glm.kernels import woq_cuda
from runners.glm.ops import linear, rms_norm, swiglu_apart
from runners.glm.packed import Int4Weight, Int8Weight, gate_up_order, interleave_gate_up

INT4_GROUP_SIZES = (32, 64, 128, 256)
GEMV_KERNELS = ("triton", "cuda")  # who runs a single activation row; more rows: the Triton matmul


# --- quantise and pack (torchao's affine quantisation primitives) ------------------------------
def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

    block = (1, weight.shape[1])
    scale, zero = choose_qparams_affine(weight, MappingType.SYMMETRIC, block, torch.int8,
                                        scale_dtype=torch.float32)
    qdata = quantize_affine(weight, block, scale, zero, torch.int8)
    return Int8Weight(qdata.contiguous(), scale.reshape(-1).contiguous())


def quantize_int4(weight: torch.Tensor, group_size: int) -> Int4Weight:
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

    out_features, in_features = weight.shape
    if group_size not in INT4_GROUP_SIZES or in_features % group_size:
        raise ValueError(f"int4 group size {group_size} must be one of {INT4_GROUP_SIZES} and divide "
                         f"the input features ({in_features})")
    block = (1, group_size)
    scale, zero = choose_qparams_affine(weight, MappingType.ASYMMETRIC, block, torch.uint8, quant_min=0,
                                        quant_max=15, scale_dtype=weight.dtype)
    q = quantize_affine(weight, block, scale, zero, torch.uint8, 0, 15)
    halves = q.view(out_features, in_features // group_size, 2, group_size // 2)
    packed = halves[:, :, 0] | (halves[:, :, 1] << 4)
    return Int4Weight(packed.reshape(out_features, in_features // 2).contiguous(),
                      scale.reshape(out_features, -1).contiguous(),
                      zero.reshape(out_features, -1).to(weight.dtype).contiguous())


def unpack_int4(packed: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, K/2] packed nibbles -> [N, K] uint8 values in input-feature order."""
    out_features = packed.shape[0]
    per_group = packed.view(out_features, groups, -1)
    return torch.stack([per_group & 0xF, per_group >> 4], dim=2).reshape(out_features, -1)


def dequantize(weight: Int8Weight | Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, K] the packed form stands for (in [gate | up] row order if gated)."""
    if isinstance(weight, Int8Weight):
        dense = (weight.qdata.float() * weight.scale[:, None]).to(dtype)
    else:
        groups = weight.scale.shape[1]
        q = unpack_int4(weight.packed, groups).float().view(weight.packed.shape[0], groups, -1)
        dense = ((q - weight.zero.float()[..., None]) * weight.scale.float()[..., None])
        dense = dense.reshape(weight.packed.shape[0], -1).to(dtype)
    return gate_up_order(dense.T).T.contiguous() if weight.gated else dense


# --- the ops: opaque to torch.compile, so the compiled layer calls our kernels as they are ------
# Optional `norm` / `residual` / `swiglu`: the op computes residual + W rms_norm(x, norm), or
# swiglu(W rms_norm(x, norm)) with W = [gate | up]: one CUDA GEMV where it runs (`linear` passes
# them only then; SwiGLU needs a `gated` weight), the same ops apart on any other path. Without
# `swiglu`, a gated weight's outputs come in its stored (pair) order: `linear` restores
# [gate | up] in traced code, where Inductor fuses the reordering into the next kernel.
def _on_gpu_kernels(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def _cuda_fusion(rows: torch.Tensor, weight: Int8Weight | Int4Weight, norm: torch.Tensor | None, eps: float,
                 residual: torch.Tensor | None, swiglu: bool) -> woq_cuda.Fusion | None:
    """The CUDA GEMV's fusion arguments, or None when it cannot fuse these."""
    if swiglu and not weight.gated:
        return None
    if norm is not None and not (norm.is_contiguous() and norm.data_ptr() % 16 == 0 and norm.dtype == rows.dtype):
        return None
    if residual is not None:
        residual = residual.reshape(-1).contiguous()
        if residual.dtype != rows.dtype:
            return None
    return woq_cuda.Fusion(norm, eps, residual, gated=swiglu)


def _apart(rows: torch.Tensor, norm: torch.Tensor | None, eps: float) -> torch.Tensor:
    return rows if norm is None else rms_norm(rows, norm, eps)


def _finish(out: torch.Tensor, weight: Int8Weight | Int4Weight, residual: torch.Tensor | None,
            swiglu: bool) -> torch.Tensor:
    """Stored-row outputs -> SwiGLU of them in [gate | up] order, or plus the residual."""
    if swiglu:
        return swiglu_apart(gate_up_order(out) if weight.gated else out)
    return out if residual is None else residual.reshape(out.shape) + out


def _packed_linear(x: torch.Tensor, weight: Int8Weight | Int4Weight, norm: torch.Tensor | None, eps: float,
                   residual: torch.Tensor | None, swiglu: bool) -> torch.Tensor:
    """What both ops compute: [residual +] rms_norm(x, norm) @ W^T for the stored rows W (a gated
    weight's in pair order), or SwiGLU of that product in [gate | up] order when asked."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    int8 = isinstance(weight, Int8Weight)
    group = None if int8 else x.shape[-1] // weight.scale.shape[1]
    fusion = None
    if (weight.gemv == "cuda" and rows.shape[0] == 1 and _on_gpu_kernels(x)
            and woq_cuda.can_run(rows, x.shape[-1], group)):
        fusion = _cuda_fusion(rows, weight, norm, eps, residual, swiglu)
    if fusion is not None:
        out = (woq_cuda.int8_gemv if int8 else woq_cuda.int4_gemv)(rows, *weight.tensors(), fusion)
    elif not _on_gpu_kernels(x):
        out = _finish(F.linear(_apart(rows, norm, eps), dequantize(weight._replace(gated=False), x.dtype)),
                      weight, residual, swiglu)
    else:
        from runners.glm.kernels import woq_triton

        matmul = woq_triton.int8_matmul if int8 else woq_triton.int4_matmul
        with torch.cuda.device(x.device):  # Triton launches on the current device, not the tensors'
            out = _finish(matmul(_apart(rows, norm, eps), *weight.tensors()), weight, residual, swiglu)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _out_features(stored_rows: int, swiglu: bool) -> int:
    return stored_rows // 2 if swiglu else stored_rows


@torch.library.custom_op("autoglm::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, gemv: str, gated: bool = False,
                norm: torch.Tensor | None = None, eps: float = 0.0,
                residual: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
    return _packed_linear(x, Int8Weight(qdata, scale, gemv, gated), norm, eps, residual, swiglu)


@int8_linear.register_fake
def _int8_linear_shape(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, gemv: str, gated: bool = False,
                       norm: torch.Tensor | None = None, eps: float = 0.0,
                       residual: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], _out_features(qdata.shape[0], swiglu)))


@torch.library.custom_op("autoglm::int4_linear", mutates_args=())
def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                gemv: str, gated: bool = False, norm: torch.Tensor | None = None, eps: float = 0.0,
                residual: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
    return _packed_linear(x, Int4Weight(packed, scale, zero, gemv, gated), norm, eps, residual, swiglu)


@int4_linear.register_fake
def _int4_linear_shape(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                       gemv: str, gated: bool = False, norm: torch.Tensor | None = None, eps: float = 0.0,
                       residual: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], _out_features(packed.shape[0], swiglu)))


class PackedLinear(nn.Module):
    """Drop-in for `nn.Linear` holding an int8 or int4 packed weight (as buffers) and the bias.
    `gated`: the layer is a SwiGLU MLP's [gate | up] projection, stored as interleaved pairs
    (its outputs still come in [gate | up] order; `linear(..., swiglu=True)` fuses the SwiGLU)."""

    def __init__(self, layer: nn.Linear, bits: int, group_size: int = 128, gemv: str = "triton",
                 gated: bool = False) -> None:
        super().__init__()
        if gemv not in GEMV_KERNELS:
            raise ValueError(f"gemv kernel {gemv!r} is not one of {GEMV_KERNELS}")
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.bits, self.gemv, self.gated = bits, gemv, gated
        dense = layer.weight.detach()
        dense = interleave_gate_up(dense) if gated else dense  # quantisation is per row: same values
        packed = quantize_int8(dense) if bits == 8 else quantize_int4(dense, group_size)
        self._tensor_names = [name for name in type(packed)._fields if name not in ("gemv", "gated")]
        for name, tensor in zip(self._tensor_names, packed.tensors(), strict=True):
            self.register_buffer(name, tensor)
        self.bias = layer.bias

    @property
    def weight(self) -> Int8Weight | Int4Weight:
        tensors = [getattr(self, name) for name in self._tensor_names]
        kind = Int8Weight if self.bits == 8 else Int4Weight
        return kind(*tensors, gemv=self.gemv, gated=self.gated)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight)
        return out if self.bias is None else out + self.bias

    def stored_bytes(self) -> int:
        """Bytes of the packed weight (data + scales + zero points); the bias is a parameter."""
        return sum(t.numel() * t.element_size() for t in self.weight.tensors())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"gemv={self.gemv}, gated={self.gated}")


def packed_linears(model: nn.Module) -> list[PackedLinear]:
    return [m for m in model.modules() if isinstance(m, PackedLinear)]


@torch.no_grad()
def pack_linears(model: nn.Module, layers: list[tuple[str, nn.Linear]], bits: int, group_size: int,
                 gemv: str = "triton") -> None:
    """Replace each named Linear of `model` by a PackedLinear (the dense weight is freed). For the
    CUDA GEMV, MLP gate_up projections are stored gated, so it can fuse their SwiGLU."""
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        gated = gemv == "cuda" and child == "gate_up_proj"
        setattr(parent, child, PackedLinear(layer, bits, group_size, gemv, gated))


def warm_up(model: nn.Module, dtype: torch.dtype, max_rows: int = 256) -> None:
    """Run every distinct packed shape once per row bucket, so kernel autotuning (Triton and the
    CUDA GEMV pick a tiling per shape) happens during set-up, never inside a measured window."""
    seen: set[tuple[int, int, int, str, bool]] = set()
    for layer in packed_linears(model):
        key = (layer.out_features, layer.in_features, layer.bits, layer.gemv, layer.gated)
        device = layer.weight[0].device
        if key in seen or device.type != "cuda":
            continue
        seen.add(key)
        rows = 1
        while rows <= max_rows:
            x = torch.zeros(rows, layer.in_features, dtype=dtype, device=device)
            linear(x, layer.weight, swiglu=layer.gated)  # gated: as decode calls it, fused
            rows *= 2
    if seen:
        torch.cuda.synchronize()
