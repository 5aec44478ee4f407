#!/usr/bin/env bash
# One prepared GPU check: every GPU figure the README quotes, in one run (< 5 minutes on an H100),
# written to ONE JSON file ($OUT/gpu_check.json, else ./gpu_check.json).
#
#   bash benchmarks/gpu_check.sh            # on the lent machine, from the repository root
#
# The machine has no network: packages its image lacks travel as wheels in .whl/ (see
# /work/.library/device/README.md: `pip download --no-deps ... -d .whl NAME==VERSION`, carried with
# the working tree). They are installed first, and the imports are checked before anything runs.
set -uo pipefail
OUTDIR="${OUT:-.}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH" || { echo "wheel install failed"; exit 2; }
fi
python3 - <<'PY' || exit 2
import importlib, sys
missing = [m for m in ("torch", "transformers", "diffusers", "peft", "accelerate", "safetensors", "simplemma")
           if importlib.util.find_spec(m) is None]
import torch
if missing or not torch.cuda.is_available():
    sys.exit(f"gpu_check: missing {missing or 'nothing'}; cuda available: {torch.cuda.is_available()}")
print("gpu_check: packages ok on", torch.cuda.get_device_name(0))
PY
T="$OUTDIR/gpu_check_parts"; mkdir -p "$T"
run() { local name=$1; shift; echo "== $name: $*"; timeout 150 python3 "$@" 2>&1 | tail -25; }
# Stage 1 at SD-1.4 size, fp16: ddim against the per-image reference, then noise and nulltext
run extract benchmarks/extract_speed.py --architecture sd14 --device cuda --dtype float16 --images 64 \
    --batch-size 16 --reference-images 8 --also noise nulltext --json "$T/extract.json"
# training-step ratios (Lavender / plain), Mllama at 11B text width: 5 and 20 layers, 1 and 4 tiles
run train5 benchmarks/train_step.py --device cuda --dtype bfloat16 --layers 5 --text-tokens 64 256 --tiles 1 4 \
    --json "$T/train5.json"
run train20 benchmarks/train_step.py --device cuda --dtype bfloat16 --layers 20 --text-tokens 256 --tiles 4 \
    --aggregation mean-mean --json "$T/train20.json"
# capture cost at Mllama and LLaVA widths
run capture benchmarks/vlm_capture.py --device cuda --dtype bfloat16 --mllama-layers 5 --llava-layers 5 \
    > "$T/capture.txt"
# last (it may be cut by its timeout without costing the figures above): the new teachers at real size,
# one-pass noise recipe, fp16 (random weights built on the machine; Flux-dev's 12 B are too slow to build here)
echo "== teachers (at most 90 s, so the whole check stays near 5 minutes)"
timeout 90 python3 benchmarks/teacher_speed.py --architecture sdxl-base sd3-medium --device cuda --dtype float16 \
    --images 16 --batch-size 8 --recipes noise --json "$T/teachers.json" 2>&1 | tail -10
python3 - "$T" "$OUTDIR/gpu_check.json" <<'PY'
import json, pathlib, sys, time, torch
parts, out = pathlib.Path(sys.argv[1]), sys.argv[2]
result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": torch.cuda.get_device_name(0)}
for p in sorted(parts.glob("*.json")):
    result[p.stem] = json.loads(p.read_text())
cap = parts / "capture.txt"
result["capture_output"] = cap.read_text()[-4000:] if cap.exists() else None
pathlib.Path(out).write_text(json.dumps(result, indent=2))
print("wrote", out)
PY
