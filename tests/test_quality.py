"""Quality on text with a trained reference (issue 20), all on CPU with the tiny preset:
make-reference's checkpoint round-trips through `model.path` (tokenizer included) and resumes
exactly; perplexity on held-out text is present, finite and equals exp(loss); KL is 0 for the
unmodified stack and grows with sparsity; Wanda scores |W| * ||x|| from training text (or
random ids, and says so); a missing or empty text file is exit 2 with the key named."""

from __future__ import annotations

import copy
import json
import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from runners.contract import TrialConfig
from runners.glm.compress import apply_sparsity, input_norms, linear_layers, prune_2_4, prune_unstructured, wanda_scores
from runners.glm.fast_model import FastGlm
from runners.glm.model import build_model
from runners.glm.quality import eval_batch, perplexity, text_windows
from runners.infer import GlmInferRunner, PromptBank
from runners.reference import Options, make_reference
from runners.reference import main as reference_main
from tuner.cli import main as cli_main

WORKLOAD = {"arrival": "closed", "concurrency": 2, "requests": 2, "warmup_requests": 0, "prompt_tokens": 8,
            "output_tokens": 2, "eval_sequences": 4, "eval_tokens": 64}
SMALL_TEXT = [str(Path(sysconfig.get_paths()["stdlib"]) / name) for name in ("json/decoder.py", "json/encoder.py")]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny CPU ops on shared cores: a second OpenMP thread only spins (measured 30x slower here).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "glm-tiny"
    make_reference(Options("glm-tiny", out, None, 0.25, 0.05, 60, 0, 0.0, 30, 30,
                           {"micro_batch_size": 4, "seq_len": 64}, None, "cpu", 0, False))
    return out


def _trial(model_path: Path, knobs: dict, workload: dict | None = None):
    config = TrialConfig("glm-infer", {"path": str(model_path)}, "cpu", {**WORKLOAD, **(workload or {})}, knobs)
    return GlmInferRunner().run(config)


# --- make-reference ------------------------------------------------------------------------------
def test_checkpoint_round_trips_through_model_path_with_its_tokenizer(reference):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(reference), local_files_only=True)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    text = (reference / "text" / "heldout.txt").read_text()[:3000]
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text  # byte-level: lossless
    loaded = build_model({"path": str(reference)}, torch.float32, "cpu", seed=123)
    meta = json.loads((reference / "reference.json").read_text())
    kept = meta["training"]["kept"]
    # The saved weights are the checkpoint of lowest validation loss (the last one, or resume/best.pt).
    source = "state.pt" if kept["step"] == meta["training"]["steps"] else "best.pt"
    trained = torch.load(reference / "resume" / source, weights_only=True)["model"]
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in trained.items())
    assert meta["training"]["steps"] == 60 and meta["split"]["heldout_tokens"] > 256
    curve = (reference / "loss_curve.csv").read_text().splitlines()
    assert len(curve) == 61 and float(curve[-1].split(",")[2]) < math.log(1024)  # below the uniform loss


def test_saved_checkpoint_is_the_lowest_validation_loss_and_validation_is_its_own_split(reference):
    import csv

    meta = json.loads((reference / "reference.json").read_text())
    with (reference / "loss_curve.csv").open() as handle:
        scored = [(float(r["validation_loss"]), int(r["step"])) for r in csv.DictReader(handle) if r["validation_loss"]]
    assert len(scored) == 2  # checkpoints at steps 30 and 60
    assert meta["training"]["kept"] == {"rule": "lowest validation loss", "step": min(scored)[1],
                                        "validation_loss": min(scored)[0]}
    split = meta["split"]
    assert split["validation_documents"] >= 1 and split["heldout_documents"] >= 1
    validation = np.load(reference / "text" / "validation_ids.npy")
    heldout = np.load(reference / "text" / "heldout_ids.npy")
    assert validation.size > 0 and not np.array_equal(validation[:64], heldout[:64])


def test_keep_last_saves_the_final_weights(tmp_path):
    out = tmp_path / "last"
    meta = make_reference(Options("glm-tiny", out, SMALL_TEXT, 0.25, 0.05, 8, 0, 0.0, 4, 4,
                                  {"micro_batch_size": 2, "seq_len": 32}, None, "cpu", 0, False, keep="last"))
    assert meta["training"]["kept"] == {"rule": "last step", "step": 8}
    loaded = build_model({"path": str(out)}, torch.float32, "cpu", seed=1)
    final = torch.load(out / "resume" / "state.pt", weights_only=True)["model"]
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in final.items())
    assert not (out / "resume" / "best.pt").exists()


def test_resume_continues_exactly_where_an_uninterrupted_run_goes(tmp_path):
    common = ["--preset", "glm-tiny", "--text", *SMALL_TEXT, "--steps", "8", "--checkpoint-every", "4",
              "--log-every", "4", "--device", "cpu", "--knob", "micro_batch_size=2", "--knob", "seq_len=32"]
    assert reference_main([*common, "--out", str(tmp_path / "straight")]) == 0
    assert reference_main([*common, "--out", str(tmp_path / "split"), "--stop-at", "4"]) == 0
    assert json.loads((tmp_path / "split" / "reference.json").read_text())["training"]["steps"] == 4
    assert reference_main([*common, "--out", str(tmp_path / "split")]) == 2  # exists: --resume needed
    assert reference_main([*common, "--out", str(tmp_path / "split"), "--resume"]) == 0
    straight = torch.load(tmp_path / "straight" / "resume" / "state.pt", weights_only=True)
    resumed = torch.load(tmp_path / "split" / "resume" / "state.pt", weights_only=True)
    assert resumed["step"] == straight["step"] == 8
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])

    def losses(run: str) -> list[str]:
        return [row.split(",")[2] for row in (tmp_path / run / "loss_curve.csv").read_text().splitlines()[1:]]
    assert losses("split") == losses("straight") and len(losses("straight")) == 8


def test_make_reference_usage_errors_are_exit_2(tmp_path, capsys):
    assert cli_main(["make-reference", "--text", str(tmp_path / "absent.txt"), "--out", str(tmp_path / "r")]) == 2
    assert reference_main(["--out", str(tmp_path / "r"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert reference_main(["--knob", "warp_speed=9"]) == 2


# --- quality on text -----------------------------------------------------------------------------
def test_unmodified_stack_has_zero_kl_and_perplexity_is_exp_of_the_heldout_loss(reference):
    result = _trial(reference, {})
    assert result.metrics["kl_divergence"] < 1e-6 and result.metrics["top1_agreement"] == 1.0
    assert "held-out text" in result.info["eval_set"]
    ppl = result.metrics["perplexity"]
    assert math.isfinite(ppl) and ppl == pytest.approx(result.info["reference_perplexity"], rel=1e-6)
    # The same windows scored by transformers' own loss (mean NLL of the shifted tokens).
    ids = text_windows(np.load(reference / "text" / "heldout_ids.npy"), 4, 64, "cpu", "held-out")
    model = build_model({"path": str(reference)}, torch.float32, "cpu", 0)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert ppl == pytest.approx(math.exp(float(loss)), rel=1e-4)
    assert perplexity(torch.full((1, 5, 8), -math.log(8)), torch.zeros(1, 5, dtype=torch.long)) == pytest.approx(8)


def test_kl_and_perplexity_change_grow_with_sparsity_and_wanda_runs_on_training_text(reference):
    kls = [_trial(reference, {"sparsity": s}).metrics["kl_divergence"] for s in (0.3, 0.6, 0.9)]
    assert 0 < kls[0] < kls[1] < kls[2]
    wanda = _trial(reference, {"sparsity": 0.6, "sparsity_method": "wanda"})
    assert "training text" in wanda.info["sparsity_calibration"]
    assert wanda.info["sparsity_measured"] == pytest.approx(0.6, abs=0.01)
    assert 0 < wanda.metrics["kl_divergence"] != kls[1] and math.isfinite(wanda.metrics["perplexity"])


def test_eval_text_file_is_the_evaluation_set_and_prompts_come_from_it(reference):
    result = _trial(reference, {}, {"eval_text": str(reference / "text" / "heldout.txt")})
    assert result.info["eval_set"].startswith("text of") and result.info["prompts"] == result.info["eval_set"]
    assert math.isfinite(result.metrics["perplexity"])
    bank = PromptBank(1024, seed=3, shared_prefix_tokens=0, text=np.arange(100, 600))
    from runners.workload import Request
    prompt = bank(Request(rid=7, arrival_s=0.0, prompt_tokens=12, output_tokens=2))
    assert prompt == list(range(prompt[0], prompt[0] + 12)) and 100 <= prompt[0] <= 588


@pytest.mark.parametrize("content, problem", [(None, "is not a file"), ("  \n", "is empty")])
def test_missing_or_empty_eval_text_is_exit_2_naming_the_key(tmp_path, capsys, reference, content, problem):
    text = tmp_path / "eval.txt"
    if content is not None:
        text.write_text(content)
    space = tmp_path / "space.yaml"
    space.write_text(f"study: q\nmodel: {{path: {reference}}}\nworkload: {{eval_text: {text}}}\n"
                     "params: {sparsity: {type: categorical, choices: [0.0]}}\n"
                     "objectives: [{metric: perplexity, direction: minimize}]\n")
    assert cli_main(["--space", str(space), "--storage", str(tmp_path / "j.log"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "workload.eval_text" in err and problem in err and not (tmp_path / "o").exists()


def test_eval_text_without_a_tokenizer_is_exit_2(tmp_path, capsys):
    text = tmp_path / "eval.txt"
    text.write_text("some text\n")
    space = tmp_path / "space.yaml"
    space.write_text(f"study: q\nmodel: {{preset: glm-tiny}}\nworkload: {{eval_text: {text}}}\n"
                     "params: {sparsity: {type: categorical, choices: [0.0]}}\n"
                     "objectives: [{metric: kl_divergence, direction: minimize}]\n")
    assert cli_main(["--space", str(space), "--storage", str(tmp_path / "j.log")]) == 2
    assert "workload.eval_text: needs a tokenizer" in capsys.readouterr().err


def test_quality_sweep_scores_every_row_on_the_same_heldout_tokens(reference):
    from benchmarks.quality_sweep import configs, markdown, sweep

    result = sweep(str(reference), "cpu", sequences=2, tokens=32)
    rows = {row["config"]: row for row in result["rows"]}
    assert list(rows) == [label for label, _ in configs()]
    assert rows["dense"]["kl"] < 1e-9 and rows["dense"]["perplexity"] == rows["dense"]["reference_perplexity"]
    assert all(row["reference_perplexity"] == rows["dense"]["perplexity"] for row in rows.values() if "perplexity" in row)
    # No 2:4 kernel on CPU: the masks are still scored, on dense weights, and the row says so.
    assert rows["wanda 2:4"]["sparsity"] == pytest.approx(0.5) and "masks on dense weights" in rows["wanda 2:4"]["note"]
    assert rows["magnitude unstructured 0.9"]["kl"] > rows["magnitude unstructured 0.3"]["kl"] > 0
    assert rows["int4 weight-only (group 128)"]["note"].startswith("infeasible: quant_bits=4")
    table = markdown(result, json.loads((reference / "reference.json").read_text()))
    assert table.count("\n| ") == len(rows) + 1 and "wanda better than magnitude at 0.5" in table
    # Each row's window NLLs average to its perplexity (equal-length windows).
    dense = rows["dense"]
    assert len(dense["window_nll"]) == 2
    assert math.exp(sum(dense["window_nll"]) / 2) == pytest.approx(dense["perplexity"], rel=1e-9)
    assert "perplexity monotone in sparsity" in table
    # ... and their window KLs to the dense model average to the row's KL (the same KL code path).
    measured = [row for row in rows.values() if "perplexity" in row]
    assert all(len(row["window_kl"]) == 2 for row in measured)
    for row in measured:
        assert sum(row["window_kl"]) / 2 == pytest.approx(row["kl"], rel=1e-5, abs=1e-7)
    assert rows["magnitude unstructured 0.9"]["window_kl"] != rows["magnitude unstructured 0.3"]["window_kl"]
    assert "wanda better than magnitude at 0.5 in KL to dense: " in table


def test_monotone_verdict_tells_a_resolved_fall_from_noise():
    from benchmarks.quality_sweep import monotone_verdict

    def rows(*series):
        return [{"window_nll": list(windows)} for windows in series]

    base = [3.0, 3.2, 2.8, 3.1, 2.9, 3.3, 3.0, 2.7]
    up = [v + 0.05 for v in base]
    assert monotone_verdict(rows(base, up, [v + 0.2 for v in base])) == "yes"
    # Every window 2 % lower: a fall the windows resolve.
    assert monotone_verdict(rows(base, [v - 0.02 for v in base])).startswith("no (a fall the windows resolve: -2.00 %")
    # Lower on average, but windows disagree: the interval contains 0.
    noisy = [v + d for v, d in zip(base, [-0.3, 0.29, -0.3, 0.29, -0.3, 0.29, -0.3, 0.29], strict=True)]
    assert monotone_verdict(rows(base, noisy)).startswith("within noise (falls of -0.")


def test_better_verdict_needs_the_windows_to_resolve_the_difference():
    from benchmarks.quality_sweep import better_verdict

    base = [3.0, 3.2, 2.8, 3.1, 2.9, 3.3, 3.0, 2.7]

    def row(windows):
        return {"window_nll": list(windows), "perplexity": math.exp(sum(windows) / len(windows))}

    assert better_verdict(row([v - 0.02 for v in base]), row(base)).startswith("yes (")
    assert better_verdict(row([v + 0.02 for v in base]), row(base)).startswith("no (")
    noisy = [v + d for v, d in zip(base, [-0.3, 0.29, -0.3, 0.29, -0.3, 0.29, -0.3, 0.29], strict=True)]
    assert better_verdict(row(noisy), row(base)).startswith("within noise (")


def test_kl_verdict_needs_the_windows_to_resolve_the_difference():
    from benchmarks.quality_sweep import better_verdict

    base = [0.048, 0.051, 0.045, 0.050, 0.047, 0.052, 0.046, 0.049]

    def row(windows):
        return {"window_kl": list(windows), "kl": sum(windows) / len(windows)}

    lower = [v - 0.004 for v in base]  # every window 0.004 nats closer to dense
    clear = better_verdict(row(lower), row(base), "kl")
    assert clear.startswith("yes (0.0445 vs 0.0485 nats: -0.0040 [95 %: -0.0040, -0.0040])")
    assert better_verdict(row(base), row(lower), "kl").startswith("no (0.0485 vs 0.0445 nats: +0.0040 [")
    noise = [0.003, -0.003, 0.002, -0.002, 0.003, -0.003, 0.002, -0.002]  # sums to 0: same mean KL
    verdict = better_verdict(row([v + d for v, d in zip(base, noise, strict=True)]), row(base), "kl")
    assert verdict.startswith("within noise (0.0485 vs 0.0485 nats: ") and "[95 %: -0.00" in verdict


def test_rows_without_window_kl_give_not_measured_and_keep_the_perplexity_verdict():
    from benchmarks.quality_sweep import checks, configs

    base = [3.0, 3.2, 2.8, 3.1, 2.9, 3.3, 3.0, 2.7]
    rows = []
    for i, (label, _) in enumerate(configs()):
        windows = [v + 0.01 * i for v in base]
        rows.append({"config": label, "perplexity": math.exp(sum(windows) / 8), "kl": 0.01 * i,
                     "window_nll": windows, "window_kl": [0.01 * i] * 8})
    by_config = {row["config"]: row for row in rows}
    lines = checks({"rows": rows})
    # Wanda rows come after the magnitude rows here: higher NLL and KL in every window.
    assert "wanda better than magnitude at 0.5: no (" in lines[2]
    assert lines[3].startswith("wanda better than magnitude at 0.5 in KL to dense: no (")
    old = [{key: value for key, value in row.items() if key != "window_kl"} for row in rows]  # JSON before KL windows
    lines = checks({"rows": old})
    assert lines[3] == "wanda better than magnitude at 0.5 in KL to dense: not measured"
    assert lines[2].startswith("wanda better than magnitude at 0.5: no (")
    del by_config["wanda unstructured 0.5"]["window_kl"]  # one row missing is enough
    assert checks({"rows": rows})[3].endswith(": not measured")


# --- wanda ---------------------------------------------------------------------------------------
def test_wanda_keeps_the_weights_of_high_activation_inputs_magnitude_drops_them():
    weight = torch.tensor([[1.0, -1.0, 0.1, -0.1], [0.5, 2.0, 0.2, 0.3]])
    norms = torch.tensor([1.0, 1.0, 100.0, 100.0])
    by_magnitude, by_wanda = weight.clone(), weight.clone()
    prune_unstructured(by_magnitude, 0.5)
    prune_unstructured(by_wanda, 0.5, wanda_scores(by_wanda, norms))
    assert (by_magnitude != 0).tolist() == [[True, True, False, False]] * 2
    assert (by_wanda != 0).tolist() == [[False, False, True, True]] * 2  # scores 10-30 vs 0.5-2, per row
    assert torch.equal(by_wanda[by_wanda != 0], weight[by_wanda != 0])


def test_wanda_2_4_keeps_the_two_best_scores_of_every_group():
    weight = torch.randn(8, 16)
    scores = torch.rand(8, 16)
    pruned = weight.clone()
    prune_2_4(pruned, scores)
    kept = pruned.view(8, 4, 4) != 0
    best = torch.zeros_like(kept).scatter_(-1, scores.view(8, 4, 4).topk(2, dim=-1).indices, True)
    assert torch.equal(kept, best) and int(kept.sum()) == 64


def test_input_norms_match_forward_hooks_on_transformers_and_fastglm():
    model = build_model({"preset": "glm-tiny"}, torch.float32, "cpu", seed=0)
    ids = eval_batch(model.config.vocab_size, 2, 16, seed=5, device="cpu")
    seen: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(
        name, args[0].reshape(-1, args[0].shape[-1]).pow(2).sum(0).sqrt())) for name, layer in linear_layers(model, False)]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    hf = input_norms(model, linear_layers(model, False), ids)
    assert all(torch.allclose(hf[name], seen[name], rtol=1e-5) for name in seen)
    fast = FastGlm(copy.deepcopy(model))
    fast_norms = input_norms(fast, linear_layers(fast, False), ids)
    # q/k/v are fused in FastGlm: its qkv input is q_proj's input.
    assert torch.allclose(fast_norms["layers.1.qkv_proj"], seen["model.layers.1.self_attn.q_proj"], rtol=1e-4)
    assert torch.allclose(fast_norms["layers.0.down_proj"], seen["model.layers.0.mlp.down_proj"], rtol=1e-4)


def test_wanda_scores_each_layer_on_the_model_with_the_earlier_layers_pruned():
    from runners.glm.compress import decoder_blocks, prune_weights

    model = build_model({"preset": "glm-tiny"}, torch.float32, "cpu", seed=0)
    ids = eval_batch(model.config.vocab_size, 4, 16, seed=3, device="cpu")
    blocks = decoder_blocks(linear_layers(model, False))
    assert len(blocks) == model.config.num_hidden_layers >= 2
    assert all(name.startswith(f"model.layers.{i}.") for i, block in enumerate(blocks) for name, _ in block)
    expected = copy.deepcopy(model)
    one_shot = input_norms(expected, linear_layers(expected, False), ids)  # the dense model's
    by_block = decoder_blocks(linear_layers(expected, False))
    for index, block in enumerate(by_block):  # by hand: prune layer i, then read layer i+1's inputs
        norms = input_norms(expected, block, ids)
        if index == 0:
            assert all(torch.equal(norms[name], one_shot[name]) for name, _ in block)
        for name, layer in block:
            prune_unstructured(layer.weight, 0.5, wanda_scores(layer.weight, norms[name]))
    last = by_block[-1][0][0]
    assert not torch.allclose(input_norms(expected, by_block[-1], ids)[last], one_shot[last])  # pruning moved them
    prune_weights(model, {"sparsity": 0.5, "sparsity_method": "wanda"}, "cpu", lambda: (ids, "test ids"))
    for (name, got), (_, want) in zip(linear_layers(model, False), linear_layers(expected, False), strict=True):
        assert torch.equal(got.weight != 0, want.weight != 0), name


def test_input_norms_stop_the_forward_at_a_later_layer():
    model = build_model({"preset": "glm-tiny"}, torch.float32, "cpu", seed=0)
    ids = eval_batch(model.config.vocab_size, 2, 8, seed=1, device="cpu")
    blocks = decoder_blocks_of(model)
    calls = []
    # The forward ends inside layer 1's first Linear: its later ones never run.
    hook = blocks[1][-1][1].register_forward_pre_hook(lambda *a: calls.append(1))
    norms = input_norms(model, blocks[0], ids, stop_at=blocks[1])
    assert set(norms) == {name for name, _ in blocks[0]} and calls == []
    input_norms(model, blocks[0], ids)
    hook.remove()
    assert calls == [1]  # without stop_at the whole model runs


def decoder_blocks_of(model):
    from runners.glm.compress import decoder_blocks

    return decoder_blocks(linear_layers(model, False))


def test_wanda_without_text_calibrates_on_random_ids_and_says_so():
    model = build_model({"preset": "glm-tiny"}, torch.float32, "cpu", seed=0)
    info = apply_sparsity(model, {"sparsity": 0.5, "sparsity_method": "wanda"}, "cpu")
    assert "random token ids" in info["sparsity_calibration"]
    assert info["sparsity_measured"] == pytest.approx(0.5, abs=1e-3)


# --- GPU: the reference trained with bf16 autocast + compile, served compiled with Wanda -------------
gpu = pytest.mark.gpu


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_compiled_reference_training_and_wanda_on_the_compiled_fast_path(tmp_path):
    common = ["--preset", "glm-tiny", "--text", *SMALL_TEXT, "--steps", "40", "--checkpoint-every", "20",
              "--log-every", "20", "--device", "cuda", "--knob", "compile=true", "--knob", "seq_len=64"]
    assert reference_main([*common, "--out", str(tmp_path / "ref")]) == 0
    meta = json.loads((tmp_path / "ref" / "reference.json").read_text())
    assert meta["training"]["knobs"]["amp_dtype"] == "bfloat16" and meta["training"]["knobs"]["compile"] is True
    config = TrialConfig("glm-infer", {"path": str(tmp_path / "ref")}, "cuda", WORKLOAD,
                         {"sparsity": 0.5, "sparsity_method": "wanda", "kv_cache": "static", "compile": True})
    result = GlmInferRunner().run(config)
    assert "training text" in result.info["sparsity_calibration"] and result.info["compiled"]
    assert math.isfinite(result.metrics["perplexity"]) and result.metrics["kl_divergence"] > 0
