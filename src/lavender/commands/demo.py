"""The miniature world, end to end: scenes → Stage 1 → AR vs Lavender fine-tuning → scores and figures.

Uses the committed world checkpoints (src/lavender/world/checkpoints/), so it needs no long training.
Writes OUT/report.md (accuracy table, attention figures), OUT/results.json and OUT/figures/.

Examples:
    lavender demo --out demo_out            # the documented demo (≤ 10 min on a 2-core CPU)
    lavender demo --out /tmp/d --quick      # smaller sets and fewer steps (≤ 3 min)
"""

from __future__ import annotations

from lavender.config import DemoConfig

CONFIGS = (DemoConfig,)


def main(cfg: DemoConfig) -> int:
    from lavender.world.demo import run_demo

    run_demo(cfg)
    print(cfg.out + "/report.md")
    return 0
