"""Cost of Lavender's attention capture at realistic widths: (a) SDPA, (b) capture + Aligner, (c) eager.

Two language models with random weights, at the real widths where the attention cost lives:

* ``mllama``: Llama-3.2-11B-Vision text width (hidden 4096, 32 heads, 8 KV heads, MLP 14336),
  ``--mllama-layers`` layers with the LAST one cross-attention (watched), 256 text tokens, one
  560-px tile = 1601 vision tokens given as precomputed ``cross_attention_states`` (the vision
  tower's cost is the same in a/b/c and is left out, which makes the ratios conservative);
* ``llava``: LLaVA-1.5-7B text width (hidden 4096, 32 heads, 32 KV heads, MLP 11008),
  ``--llava-layers`` layers (the last watched), 576 image tokens + 256 text tokens.

Per step: forward + backward with the base frozen (the LoRA setting: gradients flow through the
activations; no weight gradients), batch 1, float32 on CPU or ``--dtype bfloat16`` on a GPU.

* (a) plain SDPA, loss = mean(h²) (stands in for L_VLM);
* (b) the ``lavender`` backend capturing ``--rows`` answer rows × the image keys of the watched
  layer, ``mean-mean`` aggregation into 16 word maps, 32×32 frame, ``light`` Aligner, L_att added;
* (c) the reference approach: eager attention with ``output_attentions=True`` (every layer's full
  matrix materialised), the same slice, maps, Aligner and loss.

Prints milliseconds per step (median of ``--repeat`` after ``--warmup`` steps), memory (CUDA: peak
allocated over the step; CPU: bytes saved for backward, see :class:`PeakMemory`) and the ratios
b/a and c/a.

    python benchmarks/vlm_capture.py                      # CPU defaults (a few minutes on 2 cores)
    python benchmarks/vlm_capture.py --device cuda --dtype bfloat16 --mllama-layers 5 --llava-layers 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lavender.aligner import Aligner
from lavender.loss import attention_loss
from lavender.vlm.aggregate import aggregate
from lavender.vlm.backend import BACKEND_NAME, CapturePlan, attach_capture, register_backend
from lavender.vlm.families import ImageGrid
from lavender.vlm.rows import WordRows, batch_rows


class PeakMemory:
    """Memory of a training step.

    CUDA: the allocator's peak above the pre-step allocation. CPU: there is no allocator peak to
    read (RSS keeps freed pages and is shared with other processes), so we count the bytes of the
    distinct storages autograd saves for backward during the forward: the activation memory that
    sets a training step's peak, exactly and reproducibly.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            seen: set[int] = set()

            def pack(t: torch.Tensor) -> torch.Tensor:
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    self.peak += storage.nbytes()
                return t

            self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
            self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._hooks.__exit__(*exc)


def build(arch: str, layers: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, dict, int, int]:
    """(model, forward kwargs, watched layer, number of image keys) with random weights, base frozen."""
    torch.manual_seed(0)
    text_tokens = 256
    if arch == "mllama":
        from transformers import MllamaTextConfig
        from transformers.models.mllama.modeling_mllama import MllamaTextModel

        cfg = MllamaTextConfig(vocab_size=1024, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                               num_key_value_heads=8, num_hidden_layers=layers, cross_attention_layers=[layers - 1],
                               pad_token_id=0)
        model = MllamaTextModel(cfg)
        n_keys = 1601  # one 560-px tile: CLS + 40×40
        embeds = torch.randn(1, text_tokens, 4096) * 0.02
        kwargs = {"cross_attention_states": torch.randn(1, n_keys, 4096, dtype=dtype, device=device),
                  # all text rows after the image token see the tile: additive mask of zeros
                  "cross_attention_mask": torch.zeros(1, 1, text_tokens, n_keys, dtype=dtype, device=device),
                  "full_text_row_masked_out_mask": torch.ones(1, 1, text_tokens, 1, dtype=dtype, device=device)}
    else:
        from transformers import LlamaConfig, LlamaModel

        cfg = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                          num_key_value_heads=32, num_hidden_layers=layers, pad_token_id=0)
        model = LlamaModel(cfg)
        n_keys = 576
        embeds = torch.randn(1, n_keys + text_tokens, 4096) * 0.02
        kwargs = {}
    model = model.to(device=device, dtype=dtype).train()
    model.requires_grad_(False)
    kwargs["inputs_embeds"] = embeds.to(device=device, dtype=dtype).requires_grad_(True)
    return model, kwargs, layers - 1, n_keys


def make_step(arch: str, variant: str, model: torch.nn.Module, kwargs: dict, watched: int, n_keys: int,
              n_rows: int, device: torch.device) -> Callable[[], float]:
    seq = kwargs["inputs_embeds"].shape[1]
    if arch == "mllama":  # keys: the tile's 40×40 patches (CLS dropped); rows: the last text tokens
        keys, side, causal = torch.arange(1, 1601), 40, False
    else:  # keys: the 576 image tokens first in the sequence; rows: answer tokens at the end
        keys, side, causal = torch.arange(576), 24, True
    rows = list(range(seq - n_rows - 1, seq - 1))
    words = [[WordRows(f"w{i}", 0, 1, rows[i::16]) for i in range(16)]]  # 16 words over the rows
    batch = batch_rows(words, device=device)
    grid = ImageGrid(0, keys, side, side, (0.0, 0.0, 560.0, 560.0), (560, 560))
    plan = CapturePlan([watched], batch.rows, batch.row_valid, keys[None].to(device),
                       torch.ones(1, keys.numel(), dtype=torch.bool, device=device))
    aligner = Aligner(1, "light").to(device)
    target = torch.rand(16, 32, 32, device=device)
    register_backend()
    model.set_attn_implementation({"a": "sdpa", "b": BACKEND_NAME, "c": "eager"}[variant])
    attn_module = model.layers[watched].cross_attn if arch == "mllama" else model.layers[watched].self_attn
    capture = attach_capture({watched: attn_module}, causal=causal)

    def step() -> float:
        if variant == "b":
            capture.arm(plan)
        out = model(**kwargs, output_attentions=variant == "c", use_cache=False)
        loss = out.last_hidden_state.float().pow(2).mean()
        if variant != "a":
            if variant == "b":
                maps = capture.maps
            else:  # the reference: slice the fully materialised matrix
                full = out.attentions[watched]  # (1, H, T, S)
                maps = {watched: full[:, :, batch.rows[0]][..., keys.to(device)]}
            word = aggregate(maps, batch, [grid], "mean-mean")[0]  # (16, 1, 32, 32)
            l_att, _ = attention_loss(aligner(word), target)
            loss = loss + 10.0 * l_att
        loss.backward()
        capture.clear()
        kwargs["inputs_embeds"].grad = None
        aligner.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def run(arch: str, layers: int, device: torch.device, dtype: torch.dtype, n_rows: int, repeat: int,
        warmup: int) -> dict:
    model, kwargs, watched, n_keys = build(arch, layers, device, dtype)
    results = {}
    for variant in ("a", "b", "c"):
        step = make_step(arch, variant, model, kwargs, watched, n_keys, n_rows, device)
        for _ in range(warmup):
            step()
        times, peaks = [], []
        for _ in range(repeat):
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1000)
            peaks.append(mem.peak)
        results[variant] = (statistics.median(times), max(peaks))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--mllama-layers", type=int, default=2, help="layers, the last cross-attention (11B: 40)")
    parser.add_argument("--llava-layers", type=int, default=1, help="layers, the last watched (7B: 32)")
    parser.add_argument("--rows", type=int, default=64, help="aligned answer rows captured")
    parser.add_argument("--repeat", type=int, default=1, help="timed steps per variant after one warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--only", choices=("mllama", "llava"), help="run one model only")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_grad_enabled(True)
    print(f"device {device}, dtype {args.dtype}, threads {torch.get_num_threads()}, rows {args.rows}, "
          f"repeat {args.repeat}, warmup {args.warmup}")
    for arch, layers in (("mllama", args.mllama_layers), ("llava", args.llava_layers)):
        if args.only and arch != args.only:
            continue
        res = run(arch, layers, device, dtype, args.rows, args.repeat, args.warmup)
        (ta, ma), (tb, mb), (tc, mc) = res["a"], res["b"], res["c"]
        print(f"{arch:7s} {layers} layers | a SDPA {ta:8.0f} ms {ma / 2**20:7.0f} MiB | "
              f"b capture+Aligner {tb:8.0f} ms {mb / 2**20:7.0f} MiB | c eager {tc:8.0f} ms {mc / 2**20:7.0f} MiB | "
              f"b/a time {tb / ta:.3f} mem {mb / max(ma, 1):.3f} | c/a time {tc / ta:.3f} mem {mc / max(ma, 1):.3f}")


if __name__ == "__main__":
    main()
