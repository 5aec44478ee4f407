"""Stage 1: diffusion-model attention targets."""
