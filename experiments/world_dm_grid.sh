#!/usr/bin/env bash
# Train several world-DM variants side by side and score each one's Stage-1 maps (docs/world_dm.md).
# Usage: experiments/world_dm_grid.sh OUTDIR [DEVICE] [MINUTES]
#   DEVICE  cpu or cuda (default cuda: a GPU runs the whole grid in minutes; the CPU recipe's cost per
#           step is measured separately, see docs/world_dm.md)
#   MINUTES wall-clock cap per variant (default 6); a variant cut short still saves its pipeline and
#           train_info.json says how far it got.
# Each line of VARIANTS is "name: train-dm flags". Results: OUTDIR/<name>/{train_info.json,score.json}
# and OUTDIR/summary.md.
set -euo pipefail
out=${1:?usage: world_dm_grid.sh OUTDIR [DEVICE] [MINUTES]}
device=${2:-cuda}
minutes=${3:-6}
# the CPU recipe's budget is 60 CPU-minutes: at 0.57 CPU-s per batch-16 step (docs/world_dm.md) that is
# ~6000 steps at batch 16, ~3400 at batch 32, ~4400 with the wider UNet; s12000 shows the trend beyond it.
# docs/world_dm.md's table came from two batches of six: the first six lines (MINUTES 6.5), then the
# rest (MINUTES 5), on one H100.
VARIANTS=${VARIANTS:-"s2000: --text-layers 2 --steps 2000 --lr 1e-3
s6000: --text-layers 2 --steps 6000 --lr 1e-3
s6000_lr2: --text-layers 2 --steps 6000 --lr 2e-3
s3400_b32: --text-layers 2 --steps 3400 --batch-size 32 --lr 1e-3
s4400_wide: --text-layers 2 --steps 4400 --unet-channels 64 96 --lr 1e-3
s12000: --text-layers 2 --steps 12000 --lr 1e-3
t0_s1500: --text-layers 0 --steps 1500 --lr 1e-3
t0_s3000: --text-layers 0 --steps 3000 --lr 1e-3
t0_s6000: --text-layers 0 --steps 6000 --lr 1e-3
t0_s3000_lr2: --text-layers 0 --steps 3000 --lr 2e-3
t1_s3000: --text-layers 1 --steps 3000 --lr 1e-3
s1000: --text-layers 2 --steps 1000 --lr 1e-3"}
lav="python -m lavender"
mkdir -p "$out"
pids=()
while IFS=: read -r name flags; do
  [ -z "$name" ] && continue
  (
    $lav world train-dm --out "$out/$name" --seed 0 --device "$device" --chunk-minutes "$minutes" $flags \
      > "$out/$name.train.log" 2>&1
    $lav world score-dm --dm "$out/$name/pipeline" --n "${SCORE_N:-100}" --seed 1234 --device "$device" \
      --out "$out/$name/score.json" > "$out/$name.score.log" 2>&1
  ) &
  pids+=($!)
done <<< "$VARIANTS"
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = ["| variant | UNet steps | batch | channels | lr | wall min | best layer | colour ratio | shape ratio | "
        "colour other | shape other | res16 colour | res16 shape |", "|" + "---|" * 13]
for d in sorted(p for p in out.iterdir() if (p / "score.json").exists()):
    info, score = json.loads((d / "train_info.json").read_text()), json.loads((d / "score.json").read_text())
    t, c = score["table"], info["config"]
    best = max((g for g in t if t[g]["layers"] == 1), key=lambda g: t[g]["colour"]["ratio"] + t[g]["shape"]["ratio"])
    rows.append(f"| {d.name} | {info['step']}/{c['steps']} | {c['batch_size']} | {c['unet_channels']} | {c['lr']} | "
                f"{info['wall_seconds'] / 60:.1f} | {best} | {t[best]['colour']['ratio']:.2f} | "
                f"{t[best]['shape']['ratio']:.2f} | {t[best]['colour']['ratio_other']:.2f} | "
                f"{t[best]['shape']['ratio_other']:.2f} | {t['res16']['colour']['ratio']:.2f} | "
                f"{t['res16']['shape']['ratio']:.2f} |")
(out / "summary.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
exit $status
