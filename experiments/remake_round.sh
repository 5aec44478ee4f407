#!/bin/bash
# The runs behind this round's re-made results (docs/reproducibility.md), in the order they were made,
# on a clean clone after `make install` (constraints.txt), one job at a time on the 2-core machine
# (~2 h in all). Every step is cached under runs/ and resumes; rerun the script to go on.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
B=src/lavender/world/checkpoints/dm/stage1_binding.yaml
R="--att-loss mass --recipe 600,1e-3"

# Training cost at 1,000 aligned words (README "Long records")
$PY benchmarks/train_step.py --text-tokens 1000 --repeat 1 --json runs/bench_long.json
# Data seed 0: the scenes (train = 1,000 records, of which the first 300 train) and Stage 1, both teachers
$PY experiments/world_v2.py --out runs/world_v2 --sizes 1000 300 --seeds 0 --arms ar $R --name mass_ --no-train
$PY experiments/world_v2.py --out runs/world_v2 --sizes 1000 300 --seeds 0 --arms lavender $R --name phrase_ --teacher phrase --stage1 $B --no-train
# LLaVA world VLM: AR, oracle, shuffled (mass loss) and Lavender (binding teacher), seeds 0-2
$PY experiments/world_v2.py --out runs/world_v2 --arch llava --seeds 0 1 2 --sizes 300 --arms ar oracle shuffled $R --name mass_
$PY experiments/world_v2.py --out runs/world_v2 --arch llava --seeds 0 1 2 --sizes 300 --arms lavender $R --name phrase_ --teacher phrase --stage1 $B
# The demo at its defaults (README "The demo")
.venv/bin/lavender demo --out runs/demo_out
# Mllama headline, data seed 0, 300 records, seeds 0-4
$PY experiments/world_v2.py --out runs/world_v2 --seeds 0 1 2 3 4 --sizes 300 --arms lavender $R --name phrase_ --teacher phrase --stage1 $B
$PY experiments/world_v2.py --out runs/world_v2 --seeds 0 1 2 3 4 --sizes 300 --arms ar oracle shuffled $R --name mass_
# Not re-made this round (time): data seed 1, seeds 0-2, whose runs the pooled 300-record table adds:
#   $PY experiments/world_v2.py --out runs/world_v2_d1 --data-seed 1 --seeds 0 1 2 --sizes 300 --arms lavender $R --name phrase_ --teacher phrase --stage1 $B
#   $PY experiments/world_v2.py --out runs/world_v2_d1 --data-seed 1 --seeds 0 1 2 --sizes 300 --arms ar oracle shuffled $R --name mass_

# Summaries: a binding_n300 folder per arch and data seed whose lavender links to phrase_n300 and
# whose other arms link to mass_n300, then --no-train summaries and the contrasts with the control
link() {  # link <out>/<arch>
  mkdir -p "$1/binding_n300"
  ln -sfn ../phrase_n300/lavender "$1/binding_n300/lavender"
  for arm in ar oracle shuffled; do ln -sfn "../mass_n300/$arm" "$1/binding_n300/$arm"; done
}
link runs/world_v2/mllama; link runs/world_v2/llava
S="--sizes 300 $R --name binding_ --no-train --teacher phrase --stage1 $B"
$PY experiments/world_v2.py --out runs/world_v2 --seeds 0 1 2 3 4 $S --publish docs/results/world_v2.json
$PY experiments/world_v2.py --out runs/world_v2 --arch llava --seeds 0 1 2 $S --publish docs/results/world_v2_llava_binding.json
$PY experiments/world_v2.py --out runs/world_v2 --arch llava --seeds 0 1 2 --sizes 300 $R --name mass_ --no-train --publish docs/results/world_v2_llava_mass.json
$PY experiments/pool_paired.py runs/world_v2/summary_mllamabinding_.json --against shuffled
