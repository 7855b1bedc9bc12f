#!/usr/bin/env bash
# One short GPU check (about 2-4 minutes, bounded at ~8.5): `bench perf --device cuda` (the paper preset's
# model under bf16: img/s and the share of the GPU's dense bf16 peak) and a short paper-preset training of
# BadNets on GTSRB (2 epochs), printing the GPU's name, the training img/s, CA and ASR.
#
# Run it from the repository root:  bash scripts/gpu_check.sh
#   OUT             where perf.json, run_records.jsonl and model_meta.json go (default: ./gpu_check_out)
#   BENCH_DATA_DIR  the data root holding gtsrb/ (default: ../shared/data, else ./shared/data); without
#                   GTSRB the training step runs on the built-in synthetic set instead, and says so
#   PYTHON          the interpreter (default: python3); if it lacks the project's requirements, a fresh
#                   venv (.venv-gpu, system site-packages visible) gets them from constraints.txt
# The project itself is used from this folder (PYTHONPATH), not installed.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
REQS="import torch, torchvision, numpy, scipy, sklearn, matplotlib, click, joblib, safetensors, tqdm"

if ! "$PY" -c "$REQS" 2>/dev/null; then
    echo "== $PY lacks the requirements: a fresh venv .venv-gpu"
    python3 -m venv --system-site-packages .venv-gpu || exit 1
    .venv-gpu/bin/pip install -q -c constraints.txt torch torchvision numpy scipy scikit-learn matplotlib click joblib safetensors tqdm \
        || { echo "could not install the requirements (no network?)"; exit 1; }
    PY=.venv-gpu/bin/python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MPLBACKEND=Agg
# a fresh model cache: the training below must train, not find a cached model
export BENCH_CACHE_DIR=${BENCH_CACHE_DIR:-$(mktemp -d /tmp/gpu_check_cache.XXXXXX)}

"$PY" - <<'PYEOF' || exit 1
import torch
if not torch.cuda.is_available():
    raise SystemExit("no CUDA device visible to torch " + torch.__version__)
print(f"== torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"GPU: {torch.cuda.get_device_name(0)} (bf16: {torch.cuda.is_bf16_supported()})")
PYEOF

echo "== bench perf --device cuda"
timeout 240 "$PY" -m bench.cli perf --device cuda --json "$OUT/perf.json"
echo "perf exit status: $?"
"$PY" - "$OUT/perf.json" <<'PYEOF'
import json, sys
try:
    p = json.load(open(sys.argv[1]))["paper_train"]
except (OSError, KeyError, ValueError) as exc:
    raise SystemExit(f"no paper_train in perf.json: {exc!r}")
if not p:
    raise SystemExit("perf.json has no paper-model measurement (it is made on CUDA only)")
frac = "unknown GPU: no peak" if p["peak_fraction"] is None else f"{p['peak_fraction']:.1%} of {p['peak_tflops']:g} TFLOPS"
print(f"PAPER MODEL: {p['gpu']}: {p['img_per_s']:,.0f} img/s ({p['model']} {p['kw']}, batch {p['batch']}, {p['dtype']}, "
      f"{p['steps']} steps in {p['seconds']:.1f} s), {p['tflops']:.1f} TFLOP/s = {frac}")
PYEOF

DATA=${BENCH_DATA_DIR:-}
if [ -z "$DATA" ]; then
    for d in ../shared/data shared/data; do
        if [ -d "$d/gtsrb" ]; then DATA=$d; break; fi
    done
fi
if [ -n "$DATA" ] && [ -d "$DATA/gtsrb" ]; then
    WHERE=(--dataset gtsrb --data-dir "$DATA")
    echo "== paper-preset training, BadNets on GTSRB from $DATA, 2 epochs"
else
    WHERE=(--dataset synthetic)
    echo "== no gtsrb/ under ${BENCH_DATA_DIR:-../shared/data or shared/data}: the training check runs on the synthetic set instead"
fi
RUN=$(mktemp -d /tmp/gpu_check_run.XXXXXX)
timeout 300 "$PY" -m bench.cli run --attack badnets --defense none --preset paper "${WHERE[@]}" \
    --set train.epochs=2 --device cuda --out "$RUN" --quiet
echo "run exit status: $?"
cp "$RUN/records.jsonl" "$OUT/run_records.jsonl" 2>/dev/null
"$PY" - "$RUN" "$BENCH_CACHE_DIR" "$OUT" <<'PYEOF'
import json, shutil, sys
from pathlib import Path
run, cache, out = map(Path, sys.argv[1:])
metas = [m for m in cache.rglob("meta.json") if "train" in json.loads(m.read_text())]
for m in metas:
    meta = json.loads(m.read_text())
    t, dev = meta["train"], meta.get("device", {})
    print(f"TRAINING: {dev.get('name')}: {t['img_per_s']:,.0f} img/s, {t['seconds']:.1f} s for the 2 epochs; "
          f"CA {meta['metrics']['ca']:.3f}, ASR {meta['metrics']['asr']:.3f}")
    shutil.copy(m, out / "model_meta.json")
if not metas:
    print("TRAINING: no trained model's meta.json found under", cache)
PYEOF
echo "== files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
