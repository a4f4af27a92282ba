"""The fused decode-attention op (runners/glm/kernels/decode_attention): on CPU its reference path is
fast_model's own ops, it updates the caller's caches in place (also compiled), and it knows
where its kernel cannot run. The `gpu` tests compare the CUDA kernel with the reference over
shapes, lengths, slots, masks and split plans, and replay it in CUDA graphs (eager and
compiled)."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
from transformers.models.glm.modeling_glm import apply_rotary_pos_emb

from runners.glm.fast_model import FastGlm, attention_bias
from runners.glm.kernels import decode_attention as da
from runners.glm.model import build_model
from runners.glm.ops import grouped_attention


class Args(NamedTuple):
    """decode_attention's arguments, in its order."""
    qkv: torch.Tensor
    bias_qkv: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor
    slots: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    bias: torch.Tensor
    attend_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def with_caches_cloned(self) -> Args:
        return self._replace(k_cache=self.k_cache.clone(), v_cache=self.v_cache.clone())

    def to(self, dtype: torch.dtype) -> Args:
        """Every floating tensor in `dtype` (fp32 reference), caches cloned."""
        def cast(t):
            return None if t is None else t.to(dtype) if t.is_floating_point() else t
        return self._replace(**{name: cast(getattr(self, name)) for name in
                                ("qkv", "bias_qkv", "cos", "sin", "k_cache", "v_cache", "bias")}).with_caches_cloned()


def _rope_rows(position: int, rotary: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    # transformers' GLM table row: angles of the rotary / 2 frequencies, twice over.
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary, 2, dtype=torch.float32) / rotary))
    angles = torch.cat([position * inv_freq] * 2)
    return (angles.cos().to(device, dtype).view(1, 1, rotary), angles.sin().to(device, dtype).view(1, 1, rotary))


def _inputs(heads: int, kv_heads: int, head_dim: int, rotary: int, attend_len: int, slot: int, pad: int,
            dtype: torch.dtype, device: str, with_bias: bool = True, seed: int = 0, spare: int = 3) -> Args:
    """One decode step: random qkv and caches; cache rows the step must not read (past attend_len,
    and the slot's stale content, which the step overwrites first) hold NaN; a causal mask with
    `pad` left-padding slots."""
    gen = torch.Generator().manual_seed(seed)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(1, 1, width, generator=gen).to(device, dtype)
    bias_qkv = (0.5 * torch.randn(width, generator=gen)).to(device, dtype) if with_bias else None
    cos, sin = _rope_rows(slot, rotary, dtype, device)
    caches = []
    for _ in range(2):
        cache = torch.randn(1, kv_heads, attend_len + spare, head_dim, generator=gen)
        cache[:, :, attend_len:] = float("nan")
        cache[:, :, slot] = float("nan")
        caches.append(cache.to(device, dtype))
    slots = torch.tensor([slot], device=device)
    bias = attention_bias(slots, torch.tensor([pad], device=device), attend_len, dtype)
    return Args(qkv, bias_qkv, cos, sin, slots, *caches, bias, attend_len, heads, kv_heads, head_dim)


def _layer_ops(a: Args) -> torch.Tensor:
    """The lines of fast_model.layer_forward the op replaces, spelled out."""
    batch, seq, _ = a.qkv.shape
    hq, hkv, d = a.num_heads, a.num_kv_heads, a.head_dim
    qkv = a.qkv if a.bias_qkv is None else a.qkv + a.bias_qkv
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q = q.view(batch, seq, hq, d).transpose(1, 2)
    k = k.view(batch, seq, hkv, d).transpose(1, 2)
    v = v.view(batch, seq, hkv, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, a.cos, a.sin)
    a.k_cache[:, :, a.slots] = k
    a.v_cache[:, :, a.slots] = v
    attn = grouped_attention(q, a.k_cache, a.v_cache, a.bias, a.attend_len)
    return attn.transpose(1, 2).reshape(batch, seq, hq * d)


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit-equal, NaN rows included (the caches keep NaN where no step may read)."""
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    return True


TINY = (4, 2, 32, 16)  # glm-tiny: heads, KV heads, head_dim, rotary (partial_rotary_factor 0.5)
GLM4_9B = (32, 2, 128, 64)


# --- CPU: the reference path ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [TINY, GLM4_9B])
def test_op_on_cpu_is_fast_models_ops(shape, with_bias, dtype):
    args = _inputs(*shape, attend_len=40, slot=30, pad=5, dtype=dtype, device="cpu", with_bias=with_bias)
    expected = args.with_caches_cloned()
    want = _layer_ops(expected)
    got = da.decode_attention(*args)
    assert got.shape == (1, 1, shape[0] * shape[2]) and got.dtype == dtype
    assert torch.equal(got, want)
    assert _same(args.k_cache, expected.k_cache) and _same(args.v_cache, expected.v_cache)


def test_tiny_preset_rope_table_is_the_rotary_width_the_op_takes():
    model = FastGlm(build_model({"preset": "glm-tiny"}, torch.float32, "cpu", seed=0))
    dims = model.dims
    assert (dims.num_heads, dims.num_kv_heads, dims.head_dim, model.cos_table.shape[-1]) == TINY
    args = _inputs(*TINY, attend_len=16, slot=9, pad=0, dtype=torch.float32, device="cpu")
    args = args._replace(cos=model.cos_table[9].view(1, 1, -1), sin=model.sin_table[9].view(1, 1, -1))
    expected = args.with_caches_cloned()
    assert torch.equal(da.decode_attention(*args), _layer_ops(expected))


def test_op_schema_and_fake_pass_opcheck():
    args = _inputs(*TINY, attend_len=12, slot=4, pad=1, dtype=torch.float32, device="cpu")
    args = args._replace(k_cache=args.k_cache.nan_to_num(), v_cache=args.v_cache.nan_to_num())
    torch.library.opcheck(torch.ops.autoglm.decode_attention.default, tuple(args))


def test_compiled_op_updates_the_callers_caches_in_place():
    args = _inputs(*TINY, attend_len=20, slot=5, pad=0, dtype=torch.float32, device="cpu")
    expected = args.with_caches_cloned()
    want = _layer_ops(expected._replace(qkv=expected.qkv * 2)) * 3
    k_before = args.k_cache

    def step(qkv, *rest):
        return da.decode_attention(qkv * 2, *rest) * 3  # the op between other ops, as in the layer

    got = torch.compile(step, fullgraph=True, dynamic=False)(*args)
    torch.testing.assert_close(got, want)
    assert args.k_cache is k_before
    assert _same(args.k_cache, expected.k_cache) and _same(args.v_cache, expected.v_cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_refuses_cpu_tensors_and_float32(dtype):
    args = _inputs(*TINY, attend_len=8, slot=3, pad=0, dtype=dtype, device="cpu")
    assert not da.can_run(*args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_compile_error_says_why_without_cuda():
    assert da.compile_error() == "no CUDA device"


@pytest.mark.parametrize("attend_len", [1, 7, 16, 64, 65, 256, 1000, 4096, 8192, 32768, 131072, 200000])
def test_plan_splits_attend_len_into_whole_tiles(attend_len):
    plan = da.plan(attend_len)
    assert plan.warps in (4, 8) and 1 <= plan.splits <= da.MAX_SPLITS and plan.keys_per_split % da.TILE == 0
    assert (plan.splits - 1) * plan.keys_per_split < attend_len <= plan.splits * plan.keys_per_split
    assert plan.keys_per_split >= 4 * da.TILE  # a tile for every warp of a 4-warp block


def test_plan_is_the_fastest_measured_and_keeps_short_buckets_to_one_block():
    assert da.plan(64) == da.Plan(8, 1, 64)
    assert da.plan(256) == da.Plan(8, 1, 256)  # no combine
    assert da.plan(1024) == da.Plan(8, 8, 128)  # fastest of all plans timed on the H200
    assert da.plan(4096) == da.Plan(8, 16, 256)
    assert da.plan(131072).splits == da.MAX_SPLITS


def _merge_like_the_kernel(scores: torch.Tensor, values: torch.Tensor, keys_per_split: int, tile: int) -> torch.Tensor:
    """softmax(scores) @ values the way the kernel merges it: an online softmax per tile run,
    runs merged by their max, with max -inf taken as 0 in exp(x - max)."""
    def exp_from(x, m):
        return torch.exp(x - torch.where(m == -math.inf, torch.zeros_like(m), m))

    parts = []
    for start in range(0, scores.shape[-1], keys_per_split):
        m, s, acc = torch.tensor(-math.inf), torch.tensor(0.0), torch.zeros(values.shape[-1])
        for t in range(start, min(start + keys_per_split, scores.shape[-1]), tile):
            x = scores[t:t + tile]
            new_m = torch.maximum(m, x.max())
            p, alpha = exp_from(x, new_m), exp_from(m, new_m)
            m, s, acc = new_m, s * alpha + p.sum(), acc * alpha + p @ values[t:t + tile]
        parts.append((m, s, acc))
    top = torch.stack([m for m, _, _ in parts]).max()
    weights = torch.stack([exp_from(m, top) for m, _, _ in parts])
    total = sum(w * s for w, (_, s, _) in zip(weights, parts, strict=True))
    return sum(w * acc for w, (_, _, acc) in zip(weights, parts, strict=True)) / total


@pytest.mark.parametrize("fill", [torch.finfo(torch.bfloat16).min, torch.finfo(torch.float16).min, -math.inf])
def test_split_merge_equals_softmax_when_the_mask_hides_whole_chunks(fill):
    # Keys 0..9 (left padding) and 300.. hidden: whole chunks and whole tiles see only masked keys.
    torch.manual_seed(0)
    scores, values = torch.randn(512), torch.randn(512, 8)
    scores[:10] = scores[300:] = fill
    want = torch.softmax(scores, -1) @ values
    for keys_per_split in (16, 64, 128, 512):
        torch.testing.assert_close(_merge_like_the_kernel(scores, values, keys_per_split, 16), want)


# --- GPU: the kernel ----------------------------------------------------------------------------------------
gpu = pytest.mark.gpu

# Tolerance: compared in fp32 with fp32 torch math on the same inputs. The kernel rounds to the
# activation dtype where the MMAs and caches need it: roped q and k, the probabilities P (as the
# torch path's probs.to(dtype)) and the output, each 2^-9 relative in bf16. Scores of O(1-3)
# then move each probability by ~1 % and outputs (|v| ~ 1) by up to ~1e-2; 2e-2 holds that
# with margin, and the bf16 torch path is held to the same bound to show the bound is what bf16
# costs, not room for an indexing bug (those give O(1) errors).
TOL = {"atol": 2e-2, "rtol": 2e-2}


def _check_against_reference(args: Args, plan: da.Plan | None = None) -> None:
    exact = args.to(torch.float32)
    want = da.reference(*exact)
    torch_path = da.reference(*args.with_caches_cloned())
    k_before, v_before = args.k_cache.clone(), args.v_cache.clone()
    assert da.can_run(*args)
    got = da.run_kernel(*args, chosen=plan) if plan else da.decode_attention(*args)
    torch.cuda.synchronize()
    assert got.shape == want.shape and got.dtype == args.qkv.dtype
    torch.testing.assert_close(got.float(), want, **TOL)
    torch.testing.assert_close(torch_path.float(), want, **TOL)
    # Caches: only the slot row changes; v exactly as the torch path writes it (one rounding
    # of qkv + bias either way), k within one rounding of the fp32 rope (the torch path rounds
    # after each of its ops, the kernel once).
    slot = int(args.slots)
    others = torch.ones(args.k_cache.shape[2], dtype=torch.bool, device=args.k_cache.device)
    others[slot] = False
    for after, before in ((args.k_cache, k_before), (args.v_cache, v_before)):
        torch.testing.assert_close(after[:, :, others], before[:, :, others], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(args.v_cache[:, :, slot], exact.v_cache[:, :, slot].to(args.v_cache.dtype))
    torch.testing.assert_close(args.k_cache[:, :, slot].float(), exact.k_cache[:, :, slot], rtol=1e-2, atol=1e-2)


@gpu
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("attend_len", [1, 7, 64, 256, 1000, 4096])
@pytest.mark.parametrize("shape", [TINY, (32, 2, 32, 16), (4, 2, 128, 64), GLM4_9B], ids=["g2d32", "g16d32", "g2d128",
                                                                                         "g16d128"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_kernel_matches_the_reference(dtype, shape, attend_len, where, with_bias):
    slot = {"first": 0, "middle": attend_len // 2, "last": attend_len - 1}[where]
    args = _inputs(*shape, attend_len=attend_len, slot=slot, pad=slot // 3, dtype=dtype, device="cuda",
                   with_bias=with_bias)
    _check_against_reference(args)


@gpu
@pytest.mark.parametrize("plan", [da.Plan(4, 1, 1008), da.Plan(8, 2, 512), da.Plan(8, 4, 256), da.Plan(4, 63, 16),
                                  da.Plan(8, 8, 128)])
@pytest.mark.parametrize("shape", [TINY, GLM4_9B], ids=["g2d32", "g16d128"])
def test_gpu_every_split_plan_gives_the_same_attention(shape, plan):
    args = _inputs(*shape, attend_len=1000, slot=700, pad=100, dtype=torch.bfloat16, device="cuda")
    _check_against_reference(args, plan)


@gpu
def test_gpu_the_most_splits_the_kernel_takes():
    args = _inputs(*GLM4_9B, attend_len=1024, slot=1000, pad=3, dtype=torch.bfloat16, device="cuda")
    _check_against_reference(args, da.Plan(4, da.MAX_SPLITS, 16))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_head_dim_64_and_full_rotary(dtype):
    _check_against_reference(_inputs(8, 2, 64, 64, attend_len=300, slot=299, pad=0, dtype=dtype, device="cuda"))


@gpu
@pytest.mark.parametrize(("change", "value"), [("dtype", torch.float32), ("heads", 64), ("head_dim", 96)])
def test_gpu_shapes_the_kernel_refuses_take_the_reference(change, value):
    shape = {"heads": (64, 2, 128, 64), "head_dim": (4, 2, 96, 48)}.get(change, TINY)
    dtype = value if change == "dtype" else torch.bfloat16
    args = _inputs(*shape, attend_len=50, slot=20, pad=0, dtype=dtype, device="cuda")
    assert not da.can_run(*args)
    expected = args.with_caches_cloned()
    assert torch.equal(da.decode_attention(*args), _layer_ops(expected))


def _replay_steps(static: Args, replay, out: torch.Tensor) -> None:
    """Replays with new inputs each time: slot, mask, qkv and cache content. A ticket left
    non-zero by one replay would make the next one combine at the wrong block (or never)."""
    length, shape = static.attend_len, (static.num_heads, static.num_kv_heads, static.head_dim, static.cos.shape[-1])
    for step, slot in enumerate((length - 1, 3, length // 2, length - 7)):
        fresh = _inputs(*shape, attend_len=length, slot=slot, pad=step, dtype=static.qkv.dtype, device="cuda",
                        seed=step + 1)
        for name in ("qkv", "bias_qkv", "cos", "sin", "slots", "k_cache", "v_cache", "bias"):
            getattr(static, name).copy_(getattr(fresh, name))
        exact = fresh.to(torch.float32)
        want = da.reference(*exact)
        replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), want, **TOL)
        assert torch.equal(static.v_cache[:, :, slot], exact.v_cache[:, :, slot].to(static.v_cache.dtype))
        torch.testing.assert_close(static.k_cache[:, :, slot].float(), exact.k_cache[:, :, slot], rtol=1e-2,
                                   atol=1e-2)


@gpu
@pytest.mark.parametrize("attend_len", [1000, 4096])
@pytest.mark.parametrize("shape", [TINY, GLM4_9B], ids=["g2d32", "g16d128"])
def test_gpu_cuda_graph_replays_with_changing_inputs(shape, attend_len):
    static = _inputs(*shape, attend_len=attend_len, slot=0, pad=0, dtype=torch.bfloat16, device="cuda")
    da.decode_attention(*static)  # compile the kernel and allocate the workspace before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = da.decode_attention(*static)
    _replay_steps(static, graph.replay, out)


@gpu
def test_gpu_compiled_step_with_the_op_in_a_cuda_graph():
    # As engines/fast.py does: torch.compile(fullgraph) of a pure function, warmed up on a side
    # stream, then captured by hand.
    static = _inputs(*GLM4_9B, attend_len=1000, slot=0, pad=0, dtype=torch.bfloat16, device="cuda")
    tensors, ints = static[:8], static[8:]

    def step(qkv, *rest):
        return da.decode_attention(qkv * 1, *rest, *ints) + 0  # the op between other kernels

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            compiled(*tensors)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(*tensors)
    _replay_steps(static, graph.replay, out)
