"""Stage 2, model side: VLM text-to-image attention."""
