#!/usr/bin/env bash
# GPU call 1: slot-engine GPU tests + dynamic vs continuous probe on glm-4-9b.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv
python3 -c "import torch,transformers;print(torch.__version__, transformers.__version__)"
timeout 200 python3 -m pytest -q -m gpu tests/test_slot_engine.py -x 2>&1 | tail -25 | tee $OUT/gpu_tests.txt
timeout 330 python3 -m tuner --space gpu/chat_probe.yaml --out /tmp/runs --storage /tmp/runs/j.journal --warm 2>&1 | tee $OUT/probe.txt
python3 - <<'PY'
import json,glob
for f in sorted(glob.glob('/tmp/runs/chat_probe/trial_*/result.json')):
    r=json.load(open(f)); m=r.get('metrics',{}); i=r.get('info',{})
    keep={k:m.get(k) for k in ['throughput_tok_s','request_throughput_rps','ttft_p50_ms','ttft_p99_ms','tpot_p50_ms','tpot_p99_ms','mbu','setup_s']}
    print(f, r.get('status'), r.get('reason','')[:300], json.dumps(keep), json.dumps({k:i.get(k) for k in ['engine','compile_s','compiled','compile_error']}), json.dumps(i.get('serving',{}).get('engine_work',{}))[:400], i.get('serving',{}).get('window_end'))
PY
