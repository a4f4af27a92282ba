"""The fast engine's slot pool (continuous batching) on the tiny preset: every request gets
exactly the greedy tokens it gets alone, whatever joins and leaves around it; chunked prefill
equals whole-prompt prefill; int8 KV stays close to model-dtype KV at about half the bytes;
preempted (offloaded) sequences resume with the same tokens; the prefix cache skips cached
prefill; a pool of R rows decodes R sequences (prefill stages in the last one); the scheduler's chunked-prefill interleaving on a fake engine; every pairing of the
engine knobs runs or names why not. GPU tests are marked `gpu`."""

from __future__ import annotations

import pytest
import torch

from runners.contract import InfeasibleConfig, TrialConfig
from runners.glm.engines.base import select_engine
from runners.glm.engines.fast import FastEngine
from runners.glm.engines.kv_pool import KvPool, chunk_shapes, length_buckets, prefill_width
from runners.glm.engines.slots import SlotEngine
from runners.glm.fast_model import FastGlm
from runners.glm.model import build_model
from runners.infer import GlmInferRunner, PromptBank, prefix_length
from runners.knobs import resolve_knobs
from runners.scheduler import StepRecord, run_continuous
from runners.workload import Request
from tests.test_scheduler import FakeClock

TINY = {"preset": "glm-tiny"}
SPECS = [(5, 6), (19, 4), (3, 7), (40, 5), (7, 3), (33, 8)]  # (prompt, output) tokens per request


class Timed:
    """An iteration engine whose every call takes one second of a fake clock."""

    def __init__(self, engine: SlotEngine, clock: FakeClock) -> None:
        self.engine, self.clock = engine, clock
        self.device, self.chunked = engine.device, engine.chunked
        self.max_sequences = engine.max_sequences

    def counters(self):
        return self.engine.counters()

    def _tick(self, result):
        self.clock.t += 1.0
        return result

    def join(self, requests):
        return self._tick(self.engine.join(requests))

    def begin(self, requests):
        self.engine.begin(requests)

    def advance(self):
        return self._tick(self.engine.advance())

    def step(self):
        return self._tick(self.engine.step())

    def leave(self, rids):
        self.engine.leave(rids)


@pytest.fixture(scope="module")
def fast() -> FastEngine:
    model = build_model(TINY, torch.float32, "cpu", seed=0)
    return FastEngine(FastGlm(model), "cpu", compile_step=False)


@pytest.fixture(scope="module")
def prompts() -> PromptBank:
    return PromptBank(1024, 0, 0)


@pytest.fixture(scope="module")
def alone(fast, prompts) -> dict[int, list[int]]:
    """Each request's greedy tokens decoded by itself (batch 1, the static-batch engine)."""
    fast.begin_trial(prompts, None, "off", 0)
    requests = [Request(i, 0.0, p, o) for i, (p, o) in enumerate(SPECS)]
    return {r.rid: torch.cat(list(fast.decode([prompts(r)], r.output_tokens)), 1)[0].tolist() for r in requests}


def _slots(fast: FastEngine, prompts, kv_cache: str = "static", chunk: int = 0, rows: int = 4,
           max_sequences: int | None = None, prefix: tuple[int, ...] = ()) -> SlotEngine:
    engine = SlotEngine(fast.model, "cpu", fast._layer_fn, fast._head_fn, fast._eager_layer_fn, fast._head_fn,
                        kv_cache, 8, chunk)
    engine.begin_trial(prompts, prefix_length(prefix[0]) if prefix else None, "lru" if prefix else "off", 64)
    engine.prepare(rows, 64, 48, prefix, max_sequences=max_sequences)
    engine.record_tokens = True
    return engine


def _requests(arrivals: list[float]) -> list[Request]:
    return [Request(i, a, p, o) for i, ((p, o), a) in enumerate(zip(SPECS, arrivals, strict=True))]


# --- continuous batching == each request alone ---------------------------------------------------
def test_joins_and_leaves_in_any_order_give_each_request_its_own_greedy_tokens(fast, prompts, alone):
    engine = _slots(fast, prompts)
    r = _requests([0.0] * len(SPECS))
    joins = {0: r[:2], 1: r[2:4], 4: r[4:5], 6: r[5:]}  # decode step -> requests joining before it
    left: list[int] = []
    for step in range(14):
        if step in joins:
            engine.join(joins[step])  # rows at different lengths decode together: per-row positions
        engine.step()
        done = [rid for rid in engine.rows if len(engine.generated[rid]) >= SPECS[rid][1]]
        engine.leave(done[::-1])  # first, middle and last rows leave: the last row moves into the hole
        left += done[::-1]
    assert left == [1, 3, 0, 4, 2, 5]  # finish order of the outputs above (3 and 0 in one step)
    for req in r:
        assert engine.generated[req.rid][:req.output_tokens] == alone[req.rid], req.rid
    assert engine.counters()["shape_misses"] == 0


def test_scheduler_with_arrivals_mid_run_keeps_greedy_tokens_and_known_order(fast, prompts, alone):
    clock = FakeClock()
    engine = _slots(fast, prompts, rows=2)
    steps: list[StepRecord] = []
    timings = run_continuous(_requests([0.0, 0.5, 0.5, 2.5, 9.0, 9.0]), Timed(engine, clock), clock, 2, 0.0,
                             steps=steps)
    assert [(s.t_s, s.kind, s.rids) for s in steps][:6] == [
        (1.0, "join", (0,)), (2.0, "join", (1,)),  # one free row each time
        (3.0, "decode", (0, 1)), (4.0, "decode", (0, 1)),
        (5.0, "decode", (0, 1)),  # request 1 (4 tokens) leaves here
        (6.0, "join", (2,)),  # request 2 takes the freed row; request 3 still waits
    ]
    assert {t.rid for t in timings} == set(range(len(SPECS)))
    assert max(t.batch_size for t in timings) <= 2
    for rid, tokens in alone.items():
        assert engine.generated[rid][:len(tokens)] == tokens, rid
    assert engine.batch == 0


def test_decode_length_buckets_follow_the_longest_row(fast, prompts):
    engine = SlotEngine(fast.model, "cpu", fast._layer_fn, fast._head_fn, fast._eager_layer_fn, fast._head_fn,
                        decode_length_step=4)
    engine.begin_trial(prompts, None, "off", 0)
    engine.prepare(2, 600, 300)  # pool of 1024 positions: attend 256 or 1024
    assert engine.decode_buckets() == [(1, 256), (1, 1024), (2, 256), (2, 1024)]
    engine.record_tokens = True
    short, long = Request(0, 0.0, 20, 4), Request(1, 0.0, 300, 4)
    fast.begin_trial(prompts, None, "off", 0)
    alone = {r.rid: torch.cat(list(fast.decode([prompts(r)], 4)), 1)[0].tolist() for r in (short, long)}
    engine.join([short])
    engine.step()
    engine.join([long])  # from now on the longest row (300) needs the 1024 bucket
    for _ in range(3):
        engine.step()
    assert engine.counters()["shape_misses"] == 0
    assert engine.generated[0][:4] == alone[0] and engine.generated[1][:4] == alone[1]


# --- the staging row is the last decoding row ------------------------------------------------------
def _count_moves(engine: SlotEngine) -> list[tuple[int, int, int]]:
    """Record every row-to-row KV copy of the engine's pool (src, dst, positions)."""
    moves: list[tuple[int, int, int]] = []
    move = engine.pool.move

    def counted(src: int, dst: int, length: int) -> None:
        moves.append((src, dst, length))
        move(src, dst, length)
    engine.pool.move = counted
    return moves


def test_a_budget_of_two_rows_decodes_two_sequences_each_with_its_own_greedy_tokens(fast, prompts, alone):
    from runners.glm.engines.base import TrialPlan

    engine = fast.slot_engine("static", 8, 0)
    engine.begin_trial(prompts, None, "off", 0)
    row_mib = engine.pool_length(48 + 8) * KvPool.bytes_per_position(fast.model, False) / 2**20
    engine.prepare_trial(TrialPlan(batch_size=4, requests=4, max_prompt=48, max_output=8, eval_rows=1,
                                   eval_tokens=8, kv_memory_mib=2.5 * row_mib))
    engine.record_tokens = True
    assert (engine.gpu_rows, engine.pool.rows, engine.max_sequences) == (2, 2, 2)  # was 1 decoding row of 2
    assert engine.pool_info()["bytes"] == 2 * row_mib * 2**20
    first, second = _requests([0.0] * len(SPECS))[2:4]  # 3 + 7 and 40 + 5 tokens
    engine.join([first, second])
    assert engine.batch == 2
    for _ in range(6):
        engine.step()
    assert engine.generated[2][:7] == alone[2] and engine.generated[3][:5] == alone[3]
    engine.leave([2, 3])


def test_a_join_into_the_staging_row_copies_no_kv_and_a_join_below_it_copies_once(fast, prompts, alone):
    engine = _slots(fast, prompts, rows=2)
    assert engine.pool.rows == 2 and engine.staging_row == 1
    moves = _count_moves(engine)
    r = _requests([0.0] * len(SPECS))
    engine.join([r[0]])  # row 0: prefilled in row 1, copied down
    assert moves == [(1, 0, 5)]
    engine.join([r[2]])  # row 1 is the staging row: already in place
    assert moves == [(1, 0, 5)]
    with pytest.raises(RuntimeError, match="over-admitted: 2 running \\+ 0 in prefill \\+ 1 joining"):
        engine.begin([r[4]])  # row 1 decodes: no prefill may start
    for _ in range(5):
        engine.step()
    engine.leave([0])  # request 2 (row 1, 3 + 5 positions) moves into row 0: row 1 is free again
    assert moves[1:] == [(1, 0, 3 + 5)] and engine.rows == [2]
    engine.join([r[4]])  # prefilled in row 1, where it stays
    assert len(moves) == 2
    for _ in range(2):
        engine.step()
    for rid in (0, 2, 4):
        assert engine.generated[rid][:SPECS[rid][1]] == alone[rid], rid


@pytest.mark.parametrize("length_step", [0, 4], ids=["row-attention", "masked"])
def test_a_decode_step_covering_the_staging_row_writes_only_its_scratch_slot(fast, prompts, alone, length_step):
    """Six rows, five decoding: their step runs the 6-row bucket, which covers row 5 while a
    chunked prefill is being written there. Only row 5's scratch slot changes; the prompt's
    chunks stay intact and every request keeps its greedy tokens (row attention, or masked
    matmuls that let the idle row read its whole row)."""
    engine = SlotEngine(fast.model, "cpu", fast._layer_fn, fast._head_fn, fast._eager_layer_fn, fast._head_fn,
                        "static", 8, 8, decode_length_step=length_step)
    engine.begin_trial(prompts, None, "off", 0)
    engine.prepare(6, 64, 48)
    engine.record_tokens = True
    r = _requests([0.0] * len(SPECS))
    engine.join([r[0], r[1], r[2], r[4], r[5]])
    engine.begin([r[3]])  # 40 prompt tokens: 5 chunks of 8 into row 5
    views = []
    pool_views = engine.pool.views
    engine.pool.views = lambda first, count: views.append((first, count)) or pool_views(first, count)
    moves = _count_moves(engine)
    for chunk in range(5):
        assert engine.advance() == ([3] if chunk == 4 else [])
        if chunk == 4:
            break
        for part in engine.pool.parts:
            part[:, 5, :, engine.scratch] = 123.0  # a finite marker: the idle row's write replaces it
        before = [part[:, 5].clone() for part in engine.pool.parts]
        engine.step()
        assert views[-1] == (0, 6)  # the bucket of 5 rows is the whole pool
        after = [part[:, 5] for part in engine.pool.parts]
        for old, new in zip(before, after, strict=True):
            assert torch.equal(old[:, :, :engine.scratch], new[:, :, :engine.scratch])  # the prefill's KV
            assert not torch.equal(old[:, :, engine.scratch], new[:, :, engine.scratch])  # the idle row wrote
    assert moves == [] and engine.rows[5] == 3
    for _ in range(7):
        engine.step()
    assert all(first + count <= engine.pool.rows for first, count in views)
    for rid, tokens in alone.items():
        assert engine.generated[rid][:len(tokens)] == tokens, rid


def test_decode_buckets_are_powers_of_two_capped_at_the_pool_and_never_read_beyond_it(fast, prompts, alone):
    from runners.glm.engines.kv_pool import decode_batch, decode_batches, pool_rows

    assert decode_batches(5, 5, 2) == [2, 4, 5] and decode_batches(5, 5, 1) == [1, 2, 4, 5]
    assert decode_batches(8, 8, 2) == [2, 4, 8] and decode_batches(1, 1, 2) == [1]
    assert [decode_batch(n, 5, 2) for n in range(1, 6)] == [2, 2, 4, 4, 5]
    assert (pool_rows(5), pool_rows(5, shared_staging=False)) == (5, 6)
    assert decode_batches(3, pool_rows(3, False), 1) == [1, 2, 4]  # offloaded: bucket 4 covers its staging row
    engine = _slots(fast, prompts, rows=5)
    length = engine.pool.length
    assert engine.decode_buckets() == [(1, length), (2, length), (4, length), (5, length)]
    views = []
    pool_views = engine.pool.views
    engine.pool.views = lambda first, count: views.append((first, count)) or pool_views(first, count)
    engine.join(_requests([0.0] * len(SPECS))[:4])  # one prefill group: the pool's last 4 rows
    engine.join(_requests([0.0] * len(SPECS))[4:5])  # alone: the staging row, 4
    for _ in range(8):
        engine.step()
    assert views == [(1, 4), (4, 1)] + [(0, 5)] * 8  # then decode steps over the 5-row bucket
    assert engine.counters()["shape_misses"] == 0
    for rid in range(5):
        assert engine.generated[rid][:SPECS[rid][1]] == alone[rid], rid


# --- prefill groups -----------------------------------------------------------------------------
def test_a_prefill_group_gives_each_request_its_own_greedy_tokens_and_leaves_decoding_rows_intact(
        fast, prompts, alone):
    """Three prompts prefill as one group in the 4-row bucket of a 6-row pool (rows 2-5, row 2
    idle), then copy down to rows 0-2. The next three join while rows 0-2 decode: their group
    again runs rows 2-5, where row 2 now decodes; it writes only row 2's scratch slot, and the
    members are already in rows 3-5 (no copy). Every request keeps its greedy tokens."""
    engine = _slots(fast, prompts, rows=6)
    r = _requests([0.0] * len(SPECS))
    views, moves = [], _count_moves(engine)
    pool_views = engine.pool.views
    engine.pool.views = lambda first, count: views.append((first, count)) or pool_views(first, count)
    engine.join(r[:3])
    assert views == [(2, 4)] and moves == [(3, 0, 5), (4, 1, 19), (5, 2, 3)]
    for _ in range(2):
        engine.step()
    before = [part[:, :3].clone() for part in engine.pool.parts]
    engine.join(r[3:])
    assert views[-1] == (2, 4) and len(moves) == 3 and engine.rows == [0, 1, 2, 3, 4, 5]
    for old, new in zip(before, engine.pool.parts, strict=True):
        assert torch.equal(old[:, :, :, :engine.scratch], new[:, :3, :, :engine.scratch])
    for _ in range(8):
        engine.step()
    for rid, tokens in alone.items():
        assert engine.generated[rid][:len(tokens)] == tokens, rid
    assert engine.counters()["shape_misses"] == 0


def test_prefill_groups_take_one_piece_prompts_within_the_free_rows_and_the_chunk_budget(fast, prompts, alone):
    """Chunks of 32 tokens: a pass holds at most 32 padded tokens, so two 16-wide prompts group;
    a 40-token prompt (two chunks) prefills alone in the staging row, chunk by chunk; a 19-token
    prompt (one 32-wide piece) fills a pass by itself."""
    engine = _slots(fast, prompts, chunk=32, rows=6)
    r = _requests([0.0] * len(SPECS))
    engine.begin([r[0], r[2], r[3], r[1]])  # prompts of 5, 3, 40 and 19 tokens
    assert [engine.advance() for _ in range(4)] == [[0, 2], [], [3], [1]]
    assert not engine.prefilling
    free = _slots(fast, prompts, rows=4)  # no chunks: a pass of up to 2048 tokens, so rows decide
    free.join([r[0]])
    free.begin(r[1:4])
    assert free.advance() == [1, 2, 3]  # every free row: the 4-row bucket, row 0 (decoding) idle
    for engine_ in (engine, free):
        for _ in range(7):
            engine_.step()
        for rid in engine_.rows:
            assert engine_.generated[rid][:SPECS[rid][1]] == alone[rid], rid


def test_prefill_group_tokens_zero_prefills_one_prompt_per_pass_and_the_knob_reaches_the_runner(tmp_path):
    """`prefill_group_tokens: 0` is the one-at-a-time prefill: four prompts arriving together take
    four passes and no group shape is captured; by default they take one pass (its 4-row bucket),
    and every request gets the same tokens either way."""
    knobs = {"engine": "fast", "scheduler": "continuous", "kv_cache": "static", "batch_size": 4}
    workload = {"arrival": "closed", "concurrency": 4, "requests": 4, "warmup_requests": 0, "prompt_tokens": 12,
                "output_tokens": 3, "eval_sequences": 1, "eval_tokens": 8}
    info = {}
    for tokens in (0, 2048):
        config = TrialConfig("glm-infer", TINY, "cpu", workload, {**knobs, "prefill_group_tokens": tokens}, seed=0)
        result = GlmInferRunner().run(config)
        info[tokens] = result.info
    assert {rows for rows, _, _ in info[0]["prefill_buckets"]} == {1}
    assert (4, 16, 256) in info[2048]["prefill_buckets"]
    steps = {t: i["serving"]["engine_work"]["decode_steps"] for t, i in info.items()}
    assert steps[0] - steps[2048] == 3  # 4 prefill passes against 1; the decode steps are the same
    with pytest.raises(InfeasibleConfig, match="prefill_group_tokens"):
        GlmInferRunner().run(TrialConfig("glm-infer", TINY, "cpu", workload, {**knobs, "prefill_group_tokens": -1},
                                         seed=0))


# --- chunked prefill ----------------------------------------------------------------------------
def test_length_buckets_default_to_the_pool_length_and_step_down_when_asked():
    assert length_buckets(2048) == [2048]
    assert length_buckets(16384, 4) == [256, 1024, 4096, 16384]
    assert length_buckets(512, 4) == [512]


def test_chunk_shapes_cover_the_prompt_once():
    shapes = chunk_shapes(40, 0, 16, 256)
    assert [(o, w) for o, w, _, _ in shapes] == [(0, 16), (16, 16), (32, 8)]
    assert [(p, a) for _, _, p, a in shapes] == [(16, 256), (16, 256), (16, 256)]
    assert [prefill_width(n) for n in (1, 17, 64, 65, 300)] == [16, 32, 64, 128, 320]
    assert chunk_shapes(10, 12, 0, 256) == [(9, 1, 16, 256)]  # a fully cached prompt still runs its last token
    assert [(o, w, a) for o, w, _, a in chunk_shapes(2500, 0, 0, 4096)] == [
        (0, 1024, 1024), (1024, 1024, 2048), (2048, 452, 4096)]  # widest piece: MAX_PREFILL_WIDTH


def test_chunked_prefill_equals_whole_prompt_prefill(fast, prompts, alone):
    whole, chunked = _slots(fast, prompts), _slots(fast, prompts, chunk=8)
    req = _requests([0.0] * len(SPECS))[3]  # 40 prompt tokens: 5 chunks of 8
    whole.join([req])
    chunked.begin([req])
    done = [chunked.advance() for _ in range(5)]
    assert done == [[], [], [], [], [3]]  # it joins when its last chunk is done
    assert torch.allclose(chunked.prefill_logits, whole.prefill_logits, atol=1e-4)
    for _ in range(req.output_tokens - 1):
        whole.step()
        chunked.step()
    assert torch.allclose(chunked.logits[:1], whole.logits[:1], atol=1e-4)
    assert chunked.generated[3] == whole.generated[3] == alone[3]


def test_scheduler_interleaves_prefill_chunks_with_decode_steps(fast, prompts, alone):
    clock = FakeClock()
    engine = _slots(fast, prompts, chunk=16)
    steps: list[StepRecord] = []
    requests = [Request(0, 0.0, 5, 6), Request(3, 0.5, 40, 5)]  # request 3's prompt: 3 chunks
    timings = {t.rid: t for t in run_continuous(requests, Timed(engine, clock), clock, 4, 0.0, steps=steps)}
    kinds = [(s.t_s, s.kind, s.rids) for s in steps]
    assert kinds[:8] == [
        (1.0, "prefill", (0,)),  # one chunk: request 0 joins
        (2.0, "decode", (0,)),  # request 3 arrived: decode steps of the running batch...
        (3.0, "prefill", ()),  # ...alternate with its chunks
        (4.0, "decode", (0,)),
        (5.0, "prefill", ()),
        (6.0, "decode", (0,)),
        (7.0, "prefill", (3,)),  # last chunk: its first token (TTFT) is here
        (8.0, "decode", (0, 3)),
    ]
    assert timings[3].first_token_s == 7.0
    assert engine.generated[3] == alone[3] and engine.generated[0] == alone[0]


# --- KV policies --------------------------------------------------------------------------------
def test_int8_kv_is_close_to_model_dtype_kv_at_about_half_the_bytes(fast, prompts):
    static, quantized = _slots(fast, prompts), _slots(fast, prompts, kv_cache="quantized")
    ids = torch.randint(3, 1024, (3, 40), generator=torch.Generator().manual_seed(0))
    ref = static.teacher_forced_log_probs(ids, 20)
    got = quantized.teacher_forced_log_probs(ids, 20)
    kl = torch.nn.functional.kl_div(got, ref, log_target=True, reduction="none").sum(-1).mean()
    assert 0 < kl < 1e-3
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95
    head_dim = fast.model.dims.head_dim
    # int8 codes + one model-dtype scale per (token, head) vs head_dim model-dtype values.
    element = fast.model.dtype.itemsize
    expected = (head_dim + element) / (head_dim * element)
    assert quantized.pool.bytes_per_token() / static.pool.bytes_per_token() == pytest.approx(expected)
    bf16_ratio = (128 + 2) / (128 * 2)  # glm-4-9b's head_dim in bf16: half the bytes, plus 1.6 %
    assert bf16_ratio < 0.51


def test_quantized_kv_serves_greedy_tokens_close_to_alone(fast, prompts, alone):
    engine = _slots(fast, prompts, kv_cache="quantized")
    engine.join(_requests([0.0] * len(SPECS))[:4])
    for _ in range(7):
        engine.step()
    agree = [engine.generated[rid][:len(alone[rid])] == alone[rid] for rid in range(4)]
    assert sum(agree) >= 3  # int8 KV may flip a near-tie, not the whole stream


def test_offloaded_preemption_resumes_with_identical_tokens(fast, prompts, alone):
    engine = _slots(fast, prompts, kv_cache="offloaded", rows=2, max_sequences=4)
    # Offloaded keeps a staging row no sequence decodes in: a prefill never overwrites a GPU row.
    assert (engine.pool_info()["gpu_rows"], engine.pool_info()["rows"], engine.staging_row) == (2, 3, 2)
    clock = FakeClock()
    timings = run_continuous(_requests([0.0, 0.0, 1.5, 1.5, 2.5, 2.5]), Timed(engine, clock), clock, 4, 0.0)
    assert engine.counters()["preemptions"] > 0
    assert {t.rid for t in timings} == set(range(len(SPECS)))
    for rid, tokens in alone.items():
        assert engine.generated[rid][:len(tokens)] == tokens, rid


def test_prefix_cache_hit_prefills_only_the_rest(fast):
    prompts = PromptBank(1024, 0, 12)  # group members share their first 12 tokens
    engine = _slots(fast, prompts, prefix=(12,), rows=2)  # the second request joins in the staging row
    first, second = Request(0, 0.0, 30, 4, prefix_group=0), Request(1, 0.0, 20, 4, prefix_group=0)
    engine.join([first])
    flops_first = engine.counters()["flops"]
    engine.join([second])
    stats = engine.prefix_cache.stats
    assert (stats.lookups, stats.hits_l1, stats.tokens_reused) == (2, 1, 12)
    assert engine.counters()["flops"] - flops_first == pytest.approx(flops_first * 8 / 30)  # 20 - 12 tokens
    for _ in range(3):
        engine.step()
    plain = _slots(fast, prompts)
    plain.join([first, second])
    for _ in range(3):
        plain.step()
    assert engine.generated == plain.generated


def test_run_batch_on_the_pool_matches_alone(fast, prompts, alone):
    engine = _slots(fast, prompts, kv_cache="quantized")
    requests = _requests([0.0] * len(SPECS))[:3]
    times = engine.run_batch(requests, FakeClock())
    assert len(times) == max(r.output_tokens for r in requests)
    assert engine.batch == 0


# --- every pairing runs or says why ---------------------------------------------------------------
PAIRS = [(e, s, kv, c, p) for e in ("auto", "fast", "hf") for s in ("dynamic", "continuous")
         for kv in ("dynamic", "static", "quantized", "offloaded") for c in (False, True) for p in ("off", "lru")]


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_every_engine_pairing_selects_an_engine_or_names_the_reason(device):
    kinds = {}
    for e, s, kv, c, p in PAIRS:
        knobs = resolve_knobs("glm-infer", {"engine": e, "scheduler": s, "kv_cache": kv, "compile": c,
                                            "prefix_cache": p, "kv_bits": 8})
        try:
            kinds[(e, s, kv, c, p)] = select_engine(knobs, device)
        except InfeasibleConfig as exc:
            assert len(str(exc)) > 30, (e, s, kv, c, p)
            kinds[(e, s, kv, c, p)] = str(exc)
    on_gpu = device.startswith("cuda")
    assert kinds[("fast", "continuous", "static", on_gpu, "lru")] == "fast"
    assert kinds[("auto", "continuous", "quantized", False, "off")] == "fast"
    assert kinds[("hf", "dynamic", "static", False, "off")] == "hf"
    assert kinds[("auto", "dynamic", "dynamic", False, "off")] == "hf"
    assert "only engine=hf" in kinds[("fast", "dynamic", "dynamic", False, "off")]
    assert "kv_cache=dynamic only" in kinds[("hf", "continuous", "static", False, "off")]
    assert "scheduler=continuous" in kinds[("fast", "dynamic", "offloaded", False, "off")]
    offloaded = kinds[("fast", "continuous", "offloaded", False, "off")]
    assert (offloaded == "fast") if on_gpu else ("CUDA" in offloaded)
    if not on_gpu:
        assert "CUDA graphs" in kinds[("fast", "dynamic", "static", True, "off")]
    assert "kv_bits=8 only" in _reason({"engine": "fast", "kv_cache": "quantized", "kv_bits": 4})
    assert select_engine(resolve_knobs("glm-infer", {"kv_cache": "quantized", "kv_bits": 4}), device) == "hf"
    assert "scheduler=dynamic prefills" in _reason({"engine": "fast", "kv_cache": "static",
                                                     "prefill_chunk_tokens": 64})


def test_a_selected_engine_runs_what_its_capabilities_declare():
    from runners.glm.engines.base import CAPABILITIES
    from runners.glm.engines.hf import HFEngine

    assert FastEngine.capabilities is SlotEngine.capabilities is CAPABILITIES["fast"]
    assert HFEngine.capabilities is CAPABILITIES["hf"]
    chosen = 0
    for e, s, kv, c, p in PAIRS:
        knobs = resolve_knobs("glm-infer", {"engine": e, "scheduler": s, "kv_cache": kv, "compile": c,
                                            "prefix_cache": p, "kv_bits": 8})
        try:
            caps = CAPABILITIES[select_engine(knobs, "cuda:0" if c else "cpu")]
        except InfeasibleConfig:
            continue
        chosen += 1
        assert s in caps.schedulers and kv in caps.kv_policies, (e, s, kv, c, p)
        assert (not c or caps.compiles) and (p == "off" or caps.prefix_cache), (e, s, kv, c, p)
        assert s != "continuous" or kv in caps.continuous_kv_policies, (e, s, kv, c, p)
    assert chosen > 20


def test_model_key_keeps_the_resolved_engine_kind_and_the_engine_knob():
    from runners.glm.model_cache import model_key

    auto = resolve_knobs("glm-infer", {})
    keys = {model_key(TINY, "float32", "cpu", 0, auto, "fast"), model_key(TINY, "float32", "cpu", 0, auto, "hf"),
            model_key(TINY, "float32", "cpu", 0, {**auto, "engine": "fast"}, "fast")}
    assert len(keys) == 3
    assert model_key(TINY, "float32", "cpu", 0, {**auto, "kv_cache": "static", "prefill_chunk_tokens": 64},
                     "fast") == model_key(TINY, "float32", "cpu", 0, auto, "fast")  # cache knobs share a build


def _reason(knobs: dict) -> str:
    with pytest.raises(InfeasibleConfig) as info:
        select_engine(resolve_knobs("glm-infer", knobs), "cpu")
    return str(info.value)


def test_prefill_group_tokens_off_its_default_is_refused_where_no_slot_pool_reads_it():
    """Static batches (dynamic scheduler, static KV) and transformers' loop ignore the knob, so a
    non-default value would measure a twin of the default config: refused up front, as kv_slots."""
    assert "prefill_group_tokens sizes the slot pool" in _reason(
        {"engine": "fast", "scheduler": "dynamic", "kv_cache": "static", "prefill_group_tokens": 0})
    assert "use engine=fast" in _reason({"engine": "hf", "kv_cache": "dynamic", "prefill_group_tokens": 512})
    for knobs in ({"scheduler": "continuous", "kv_cache": "static"},
                  {"scheduler": "dynamic", "kv_cache": "quantized", "kv_bits": 8},
                  {"scheduler": "dynamic", "kv_cache": "static", "prefill_group_tokens": 2048}):
        select_engine(resolve_knobs("glm-infer", {"engine": "fast", "prefill_group_tokens": 0, **knobs}), "cpu")


WORKLOAD = {"arrival": "poisson", "rate_rps": 200.0, "requests": 6, "warmup_requests": 1,
            "prompt_tokens": {"dist": "uniform", "low": 4, "high": 40, "max": 40},
            "output_tokens": {"dist": "uniform", "low": 1, "high": 6, "max": 6}, "eval_sequences": 2,
            "eval_tokens": 16, "shared_prefix_tokens": 8, "shared_prefix_groups": 2}


@pytest.mark.parametrize("knobs", [
    {"scheduler": "continuous", "kv_cache": "static"},
    {"scheduler": "continuous", "kv_cache": "static", "prefill_chunk_tokens": 16, "prefix_cache": "lru"},
    {"scheduler": "continuous", "kv_cache": "quantized", "kv_bits": 8},
    {"scheduler": "dynamic", "kv_cache": "quantized", "kv_bits": 8},
    {"scheduler": "dynamic", "kv_cache": "static", "engine": "hf"},
], ids=lambda k: ",".join(f"{n}={v}" for n, v in k.items()))
def test_engine_pairings_run_a_trial_with_nothing_captured_in_the_window(knobs):
    config = TrialConfig("glm-infer", TINY, "cpu", WORKLOAD, {"batch_size": 3, **knobs}, seed=0)
    result = GlmInferRunner().run(config)
    assert result.status == "ok" and result.metrics["throughput_tok_s"] > 0
    assert result.info["engine"] == ("hf" if knobs.get("engine") == "hf" else "fast")
    work = result.info["serving"]["engine_work"]
    assert work.get("shape_misses", 0.0) == 0.0  # prepare() saw every shape of the trial
    if knobs.get("prefix_cache") == "lru":
        assert result.metrics["prefix_hit_rate"] > 0


# --- GPU --------------------------------------------------------------------------------------------
gpu = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_fast():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    # float32 (no TF32 by default): batch composition must not flip a greedy token by rounding.
    model = build_model(TINY, torch.float32, "cuda:0", seed=0)
    return FastEngine(FastGlm(model), "cuda:0", compile_step=True)


@gpu
@pytest.mark.parametrize("chunk", [0, 16])
@pytest.mark.parametrize("kv_cache", ["static", "offloaded"])
def test_gpu_graphs_and_compile_keep_each_requests_greedy_tokens_and_capture_nothing_late(cuda_fast, kv_cache,
                                                                                           chunk):
    prompts = PromptBank(1024, 0, 0)
    cuda_fast.begin_trial(prompts, None, "off", 0)
    requests = _requests([0.0, 0.0, 1.5, 1.5, 2.5, 2.5])
    alone = {r.rid: torch.cat(list(cuda_fast.decode([prompts(r)], r.output_tokens)), 1)[0].tolist()
             for r in requests}
    engine = cuda_fast.slot_engine(kv_cache, 8, chunk)
    engine.begin_trial(prompts, None, "off", 0)
    engine.prepare(2 if kv_cache == "offloaded" else 4, 64, 48, max_sequences=4)
    engine.record_tokens = True
    assert engine.decode_buckets() and all(d.graph is not None for d in engine._decode.values())
    clock = FakeClock()
    run_continuous(requests, Timed(engine, clock), clock, 4, 0.0)
    assert engine.counters()["shape_misses"] == 0
    for rid, tokens in alone.items():
        assert engine.generated[rid][:len(tokens)] == tokens, rid
    if kv_cache == "offloaded":
        assert engine.counters()["preemptions"] > 0


@gpu
@pytest.mark.parametrize("rows,batches", [(1, [1]), (2, [2]), (3, [2, 3])])
def test_gpu_every_row_of_a_small_pool_decodes_in_graphs_with_each_requests_greedy_tokens(cuda_fast, rows, batches):
    """The staging row is the last decoding row under graphs and compile: one row decodes in the
    batch-1 bucket (its shape-specialised compile), two in bucket 2 (covering row 1 while a
    chunked prefill is written there), three in a top bucket of 3 (no power of two)."""
    prompts = PromptBank(1024, 0, 0)
    cuda_fast.begin_trial(prompts, None, "off", 0)
    requests = _requests([0.0, 0.0, 1.5, 1.5, 2.5, 2.5])
    alone = {r.rid: torch.cat(list(cuda_fast.decode([prompts(r)], r.output_tokens)), 1)[0].tolist()
             for r in requests}
    engine = cuda_fast.slot_engine("static", 8, 16)
    engine.begin_trial(prompts, None, "off", 0)
    engine.prepare(rows, 64, 48)
    engine.record_tokens = True
    assert engine.pool.rows == rows and [b for b, _ in engine.decode_buckets()] == batches
    assert all(d.graph is not None for d in engine._decode.values())
    clock = FakeClock()
    run_continuous(requests, Timed(engine, clock), clock, rows, 0.0)
    assert engine.counters()["shape_misses"] == 0
    for rid, tokens in alone.items():
        assert engine.generated[rid][:len(tokens)] == tokens, rid


@gpu
def test_gpu_continuous_trial_compiled_has_no_capture_in_the_window():
    knobs = {"scheduler": "continuous", "kv_cache": "static", "compile": True, "batch_size": 4,
             "prefill_chunk_tokens": 16, "prefix_cache": "lru"}
    result = GlmInferRunner().run(TrialConfig("glm-infer", TINY, "cuda:0", WORKLOAD, knobs, seed=0))
    assert result.status == "ok" and result.info["compiled"]
    assert result.info["serving"]["engine_work"]["shape_misses"] == 0.0


@gpu
def test_gpu_int8_kv_in_graphs_stays_close_to_model_dtype_kv(cuda_fast):
    prompts = PromptBank(1024, 0, 0)
    requests = _requests([0.0] * len(SPECS))[:4]
    generated = {}
    for kv in ("static", "quantized"):
        engine = cuda_fast.slot_engine(kv, 8, 0)
        engine.begin_trial(prompts, None, "off", 0)
        engine.prepare(4, 64, 48)
        engine.record_tokens = True
        engine.join(requests)
        for _ in range(7):
            engine.step()
        generated[kv] = engine.generated
        assert engine.counters()["shape_misses"] == 0
    agree = [generated["quantized"][r.rid][:r.output_tokens] == generated["static"][r.rid][:r.output_tokens]
             for r in requests]
    assert sum(agree) >= 3


def test_compiled_int8_decode_attention_reads_codes_like_the_eager_matmuls():
    from runners.glm.fast_model import quantize_kv, row_bias
    from runners.glm.ops import grouped_attention

    torch.manual_seed(0)
    q = torch.randn(3, 4, 1, 32)
    k, k_scale = quantize_kv(torch.randn(3, 2, 64, 32), torch.float32)
    v, v_scale = quantize_kv(torch.randn(3, 2, 64, 32), torch.float32)
    bias = row_bias(torch.tensor([[5], [40], [63]]), 64, torch.float32)  # rows at their own lengths
    eager = grouped_attention(q, k, v, bias, 64, k_scale, v_scale)  # cast + matmuls
    compiled = torch.compile(grouped_attention, fullgraph=True, dynamic=False)(q, k, v, bias, 64, k_scale, v_scale)
    assert torch.allclose(compiled, eager, atol=1e-5)


@gpu
def test_gpu_fused_decode_attention_serves_single_rows_through_the_slot_pool():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = build_model(TINY, torch.bfloat16, "cuda:0", seed=0)
    fast = FastEngine(FastGlm(model), "cuda:0", compile_step=True, fused_attention=True)
    prompts = PromptBank(1024, 0, 0)
    fast.begin_trial(prompts, None, "off", 0)
    requests = _requests([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    alone = {r.rid: torch.cat(list(fast.decode([prompts(r)], r.output_tokens)), 1)[0].tolist() for r in requests}
    engine = fast.slot_engine("static", 8, 0)
    engine.begin_trial(prompts, None, "off", 0)
    engine.prepare(1, 64, 48)  # one row: every decode step is the batch-1 (fused kernel) bucket
    engine.record_tokens = True
    clock = FakeClock()
    run_continuous(requests, Timed(engine, clock), clock, 1, 0.0)
    assert engine.decode_buckets() == [(1, 256)] and engine.counters()["shape_misses"] == 0
    for rid, tokens in alone.items():
        # bf16: the prefill GEMMs differ in width (padded vs exact), so only the first tokens are pinned.
        assert engine.generated[rid][:2] == tokens[:2], rid


def test_kv_memory_budget_sizes_the_pool_int8_fits_about_twice_the_rows(fast, prompts):
    """`kv_memory_mib`: rows = floor(budget / one row's KV); the staging row is the last decoding
    row (offloaded keeps one of its own) and the top decode bucket is the pool, so no padding."""
    plain = fast.slot_engine("static", 8, 0)
    row = plain.pool_length(300) * (2 * 2 * 2 * 32 * 4)  # positions x (K+V, layers, kv heads, dim, fp32)
    assert row == plain.pool_length(300) * KvPool.bytes_per_position(fast.model, False)
    assert plain.rows_for_budget(16 * row, 300) == 16
    assert plain.rows_for_budget(17 * row, 300) == 17  # was 16: a 17-row pool allocated 32 rows' bucket
    assert plain.rows_for_budget(31.9 * row, 300) == 31
    assert plain.rows_for_budget(2 * row, 300) == 2  # was 1: bf16 rows at 1024 MiB / 350 MiB decoded 1
    assert plain.rows_for_budget(row, 300) == 1
    assert plain.rows_for_budget(row - 1, 300) == 0
    quantized = fast.slot_engine("quantized", 8, 0)
    per_row_q = quantized.pool_length(300) * KvPool.bytes_per_position(fast.model, True)
    assert per_row_q == quantized.pool_length(300) * 2 * 2 * 2 * (32 + 4)  # int8 codes + an fp32 scale
    assert quantized.rows_for_budget(16 * row, 300) == 16 * row // per_row_q == 56
    offloaded = fast.slot_engine("offloaded", 8, 0)
    assert offloaded.rows_for_budget(16 * row, 300) == 15  # its own staging row
    assert offloaded.rows_for_budget(row, 300) == 0


def test_kv_memory_budget_through_the_runner(tmp_path):
    knobs = {"engine": "fast", "scheduler": "continuous", "kv_cache": "static", "batch_size": 8, "kv_memory_mib": 1e-3}
    config = TrialConfig("glm-infer", TINY, "cpu", {"requests": 2, "rate_rps": 50.0, "prompt_tokens": 8,
                                                    "output_tokens": 2, "eval_sequences": 1, "eval_tokens": 8},
                         knobs, seed=0)
    with pytest.raises(InfeasibleConfig, match="kv_memory_mib"):
        GlmInferRunner().run(config)
    config.knobs["kv_memory_mib"] = 1.0  # tiny: 1 MiB holds a few rows of 18 positions
    result = GlmInferRunner().run(config)
    assert result.metrics["throughput_tok_s"] > 0
    pool = result.info["kv_pool"]
    assert 1 <= pool["gpu_rows"] < 8 and pool["bytes"] <= 2**20
    # Every allocated row decodes: the budget's floor(1 MiB / a row's bytes) rows, no staging extra.
    row_bytes = pool["bytes"] // pool["rows"]
    assert pool["rows"] == pool["gpu_rows"] == 2**20 // row_bytes


def _compiled_slot_engine(prompts, rows: int, max_len: int, max_prompt: int) -> tuple[SlotEngine, FastGlm]:
    """A slot engine on the compile path (CUDA-only in trials), compiled by Inductor's CPU backend,
    with Dynamo's caches and counters reset so a test can count the graphs it builds."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = FastGlm(build_model(TINY, torch.float32, "cpu", seed=0))
    fast = FastEngine(model, "cpu", compile_step=False)
    fast.compiled = True
    engine = fast.slot_engine("static", 8, 0)
    engine.begin_trial(prompts, None, "off", 0)
    engine.prepare(rows, max_len, max_prompt)
    engine.record_tokens = True
    return engine, model


def test_multi_row_compile_is_one_graph_for_every_batch_bucket_and_one_for_every_prefill_width(prompts):
    """The slot pool's multi-row decode compiles once (batch dimension dynamic, weights static):
    buckets 5 (a five-row pool's top bucket, no power of two), 4 and 2 all run the same layer
    graph (the head runs eagerly), and no bucket is batch 1. Prefill pieces of widths 16, 32 and
    64 run one more graph (width dynamic) alone, and prefill groups of 2 and 4 rows (rows
    dynamic too) one more; compiled, a group spans at most 4 of the 5 rows (a view of the whole
    pool would be one more graph). Every request still gets its own greedy tokens."""
    from torch._dynamo.utils import counters

    engine, model = _compiled_slot_engine(prompts, 5, 64, 48)
    assert engine.decode_buckets() == [(2, 256), (4, 256), (5, 256)] and engine.pool.rows == 5
    requests = [Request(rid, 0.0, length, 8) for rid, length in enumerate((6, 20, 40, 9, 33, 12, 7, 25))]
    assert {prefill_width(r.prompt_tokens) for r in requests} == {16, 32, 64}
    alone = {r.rid: torch.cat(list(FastEngine(model, "cpu", False).decode([prompts(r)], 8)), 1)[0].tolist()
             for r in requests}
    for rid in (0, 1, 2):  # alone in the staging row: widths 16, 32, 64
        engine.join([requests[rid]])
    engine.leave([0, 1, 2])
    engine.join(requests[3:5])  # a group of 2 rows
    engine.join(requests[5:8])  # 3 of the 3 free rows: the 4-row bucket
    engine.leave([3, 4, 5, 6, 7])
    assert engine.group_rows == 4
    engine.generated.clear()
    views = []
    pool_views = engine.pool.views
    engine.pool.views = lambda first, count: views.append((first, count)) or pool_views(first, count)
    engine.join(requests[:5])  # 5 prompts into an empty pool: a group of 4 rows, then one alone
    assert views == [(1, 4), (4, 1)]
    for leaving in ([], [0, 1], [2], [3]):  # 5 rows (bucket 5), 3 (4), 2 (2), 1 (2)
        engine.leave(leaving)
        engine.step()
    assert counters["stats"]["unique_graphs"] == 3
    assert engine.generated[4][:5] == alone[4][:5]
    assert engine.generated[3][:4] == alone[3][:4]
    torch._dynamo.reset()


def test_prefill_compile_is_one_graph_for_every_attend_length(prompts):
    """Prefill chunks attending over 256 and 512 positions run one compiled graph: the attend
    length is read off the bias, whose last dimension the compile marks dynamic, not taken from
    an int that would recompile per value."""
    from torch._dynamo.utils import counters

    engine, model = _compiled_slot_engine(prompts, 2, 700, 600)
    assert {a for _, a in engine.prefill_shapes(300)} == {256, 512}
    engine.join([Request(0, 0.0, 20, 2), Request(1, 0.0, 300, 2)])
    assert counters["stats"]["unique_graphs"] == 1
    alone = torch.cat(list(FastEngine(model, "cpu", False).decode([prompts(Request(1, 0.0, 300, 2))], 2)), 1)
    assert engine.generated[1][:1] == alone[0].tolist()[:1]
    torch._dynamo.reset()


def _satisfying(rule) -> dict:
    """Knob values under which every condition of a `Together` rule holds."""
    from runners.knobs import INFER_KNOBS

    values = {}
    for w in rule.when:
        if w.op == "==":
            values[w.knob] = w.value
        elif w.op == "!=":
            choices = INFER_KNOBS[w.knob].choices
            values[w.knob] = next(c for c in choices if c != w.value) if choices else w.value // 2
        else:
            values[w.knob] = w.value + 1 if w.op == ">" else w.value - 1
    return values


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_the_tuner_knows_each_refused_combination_the_engine_refuses(device):
    from runners.knobs import FAST_ENGINE_TOGETHER
    from runners.registry import refused_up_front

    for rule in FAST_ENGINE_TOGETHER:
        # on a KV policy the fast engine runs (its own single-value refusals come first)
        knobs = resolve_knobs("glm-infer", {"engine": "fast", "kv_cache": "static", "kv_bits": 8, **_satisfying(rule)})
        with pytest.raises(InfeasibleConfig) as refused:
            select_engine(knobs, device)
        # one declaration: the engine's refusal (on any device) is the one the tuner reads up front
        assert str(refused.value) == f"engine=fast: {rule.reason}" == refused_up_front("glm-infer", {}, knobs)
    runs = resolve_knobs("glm-infer", {"engine": "fast", "kv_cache": "static", "scheduler": "continuous"})
    assert refused_up_front("glm-infer", {}, runs) == ""
    # engine=auto may hand a config the fast engine refuses to engine=hf: not known up front
    auto = resolve_knobs("glm-infer", {"engine": "auto", "kv_cache": "offloaded", "scheduler": "dynamic"})
    assert refused_up_front("glm-infer", {}, auto) == ""
