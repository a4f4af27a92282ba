"""The row-attention decode kernel (`runners.glm.kernels.row_attention`): each row attends over its own
length, plain or int8 KV. On CPU the Triton kernel runs under Triton's interpreter (float32 and
float16: the interpreter has no bfloat16) against the torch reference; the reference equals the
masked matmuls (`grouped_attention` with a row bias) that the slot engine used before; on the GPU
(`gpu`) the kernel in bfloat16, eagerly and inside a compiled, CUDA-graph-captured step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runners.glm.fast_model import quantize_kv, row_bias
from runners.glm.kernels import row_attention
from runners.glm.ops import grouped_attention


def _case(batch: int, heads: int, kv_heads: int, dim: int, length: int, dtype: torch.dtype, device: str = "cpu"):
    gen = torch.Generator().manual_seed(batch * 1000 + heads + length)
    q = torch.randn(batch, heads, dim, generator=gen).to(device, dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen).to(device, dtype)
    v = torch.randn(batch, kv_heads, length, dim, generator=gen).to(device, dtype)
    # lengths 1, the whole pool, one past a split, a block boundary and a ragged one, repeated
    pattern = [1, length, min(length, row_attention.SPLIT_KEYS + 1), 64, 77]
    lengths = torch.tensor([pattern[i % len(pattern)] for i in range(batch)], device=device)
    return q, k, v, lengths


SHAPES = [(5, 4, 2, 32, 512), (3, 32, 2, 128, 300), (2, 8, 8, 64, 256)]  # G = 2, 16, 1


def test_reference_equals_masked_matmuls():
    """The lengths path computes what the bias path computed: softmax over positions < length."""
    for shape in SHAPES:
        q, k, v, lengths = _case(*shape, torch.float32)
        pos = (lengths - 1)[:, None]  # the new token's position: it sees keys <= pos
        masked = grouped_attention(q[:, :, None], k, v, row_bias(pos, k.shape[2], q.dtype), k.shape[2])[:, :, 0]
        torch.testing.assert_close(row_attention.reference(q, k, v, lengths, None, None), masked)


def test_reference_reads_only_the_rows_length():
    q, k, v, lengths = _case(*SHAPES[0], torch.float32)
    before = row_attention.reference(q, k, v, lengths, None, None)
    k2, v2 = k.clone(), v.clone()
    for row, n in enumerate(lengths.tolist()):
        k2[row, :, n:] = float("nan")
        v2[row, :, n:] = 1e6
    assert torch.equal(row_attention.reference(q, k2, v2, lengths, None, None), before)


INTERPRETED = """
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from runners.glm.kernels import row_attention
from runners.glm.fast_model import quantize_kv
from tests.test_row_attention import SHAPES, _case

assert row_attention.can_run(torch.zeros(1))
for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
    for i, shape in enumerate(SHAPES):
        q, k, v, lengths = _case(*shape, dtype)
        lengths = lengths.to(torch.int32) if i % 2 else lengths  # the kernel reads either dtype
        got = row_attention.row_decode_attention(q, k, v, lengths)
        want = row_attention.reference(q, k, v, lengths, None, None)
        assert got.dtype == dtype and got.shape == q.shape
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
        (kc, ks), (vc, vs) = quantize_kv(k, dtype), quantize_kv(v, dtype)
        got = row_attention.row_decode_attention(q, kc, vc, lengths, ks, vs)
        want = row_attention.reference(q, kc, vc, lengths, ks, vs)
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
# positions past each row's length are never read: NaN there changes nothing
q, k, v, lengths = _case(*SHAPES[1], torch.float32)
before = row_attention.row_decode_attention(q, k, v, lengths)
for row, n in enumerate(lengths.tolist()):
    k[row, :, n:] = float("nan")
    v[row, :, n:] = float("nan")
assert torch.equal(row_attention.row_decode_attention(q, k, v, lengths), before)
# q read through its strides: a slice of a fused qkv row (stride 1 on D, not contiguous) and a
# transposed q (stride 1 elsewhere, copied) give the contiguous q's result exactly
q, k, v, lengths = _case(*SHAPES[0], torch.float32)
batch, heads, dim = q.shape
qkv = torch.cat([q.reshape(batch, heads * dim), torch.randn(batch, 3 * dim)], dim=1)
sliced = qkv[:, :heads * dim].view(batch, heads, dim)
assert not sliced.is_contiguous() and sliced.stride(2) == 1
before = row_attention.row_decode_attention(q, k, v, lengths)
assert torch.equal(row_attention.row_decode_attention(sliced, k, v, lengths), before)
assert torch.equal(row_attention.row_decode_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, lengths), before)
# the op's fake gives the real partials' shapes and dtypes (plain and int8 KV, G = 2, 16, 1)
for shape in SHAPES:
    q, k, v, lengths = _case(*shape, torch.float16)
    (kc, ks), (vc, vs) = quantize_kv(k, torch.float16), quantize_kv(v, torch.float16)
    for args in ((q, k, v, lengths, None, None), (q, kc, vc, lengths, ks, vs)):
        real = row_attention.row_decode_partials(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = row_attention.row_decode_partials(*[None if a is None else mode.from_tensor(a) for a in args])
        assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real], (shape, fake, real)
        assert real[0].shape[3] >= shape[1] // shape[2] and real[0].shape[2] == -(-shape[4] // row_attention.SPLIT_KEYS)
# compiled (dynamic shapes, the fake's symbolic shapes): the merge is in the traced graph, outside
# the op, and the result equals the eager one
graphs = []
def keep(gm, inputs):
    graphs.append(gm)
    return gm
compiled = torch.compile(row_attention.row_decode_attention, backend=keep, dynamic=True, fullgraph=True)
for shape in SHAPES[:2]:
    q, k, v, lengths = _case(*shape, torch.float32)
    torch.testing.assert_close(compiled(q, k, v, lengths), row_attention.row_decode_attention(q, k, v, lengths))
code = graphs[-1].code
assert "row_decode_partials" in code and "amax" in code and "exp" in code, code
compiled = torch.compile(row_attention.row_decode_attention, backend="aot_eager", dynamic=True, fullgraph=True)
for shape in SHAPES[:2]:
    q, k, v, lengths = _case(*shape, torch.float32)
    (kc, ks), (vc, vs) = quantize_kv(k, torch.float32), quantize_kv(v, torch.float32)
    torch.testing.assert_close(compiled(q, kc, vc, lengths, ks, vs),
                               row_attention.row_decode_attention(q, kc, vc, lengths, ks, vs))
print("interpreted ok")
"""


def test_kernel_matches_reference_under_the_interpreter():
    """The op's partials merged outside it equal the reference; its fake shapes are the real ones;
    compiled with dynamic shapes, the merge is traced outside the op. Triton's interpreter must be
    chosen before triton is first imported: a fresh process."""
    pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[test]' installs it)")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "interpreted ok" in done.stdout


def test_int8_codes_close_to_model_dtype_kv():
    """int8 KV (per token and head) stays close to the unquantised attention."""
    q, k, v, lengths = _case(*SHAPES[1], torch.float32)
    (kc, ks), (vc, vs) = quantize_kv(k, torch.float32), quantize_kv(v, torch.float32)
    exact = row_attention.reference(q, k, v, lengths, None, None)
    quant = row_attention.reference(q, kc, vc, lengths, ks, vs)
    assert (quant - exact).abs().max() < 0.05 * exact.abs().max()


@pytest.mark.gpu
def test_kernel_bf16_on_gpu_eager_and_captured():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    row_attention._kernel.cache_clear()
    for shape in [(64, 32, 2, 128, 2048), *SHAPES]:
        q, k, v, lengths = _case(*shape, torch.bfloat16, "cuda")
        want = row_attention.reference(q, k, v, lengths, None, None).float()
        got = row_attention.row_decode_attention(q, k, v, lengths)
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
        (kc, ks), (vc, vs) = quantize_kv(k, torch.bfloat16), quantize_kv(v, torch.bfloat16)
        want8 = row_attention.reference(q, kc, vc, lengths, ks, vs).float()
        compiled = torch.compile(row_attention.row_decode_attention, dynamic=True, fullgraph=True)
        compiled(q, kc, vc, lengths, ks, vs)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = compiled(q, kc, vc, lengths, ks, vs)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), want8, atol=2e-2, rtol=2e-2)
