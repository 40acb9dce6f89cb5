"""Hook overhead: plain vs magsdk vs diffusers' MagCache, side by side in one process.

For each curve (one that skips nothing, one that skips about half) every method runs the same
denoising loop on the same weights, interleaved over several rounds; the table shows the best
(minimum) time per generation over the rounds — the least disturbed by other processes — and its
ratio to the ideal time ``plain × computed / total``.

    python tools/bench_overhead.py                    # mid-size CPU Flux config
    python tools/bench_overhead.py --tiny --rounds 20                     # hook overhead per call
    python tools/bench_overhead.py --full --device cuda --dtype bfloat16   # FLUX.1-dev architecture
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.hooks import MagCacheConfig as DiffusersMagCacheConfig
from diffusers.hooks import apply_mag_cache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import magsdk
from strategies.flux import CALIBRATIONS

FLUX_RATIOS: list[float] = CALIBRATIONS[0]["branches"]["default"]

TINY = dict(in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
MID = dict(in_channels=16, num_layers=4, num_single_layers=8, attention_head_dim=32, num_attention_heads=4,
           joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 12, 12))
FULL = dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def build(size: str, device: str, dtype: torch.dtype) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    config = {"full": FULL, "mid": MID, "tiny": TINY}[size]
    model = FluxTransformer2DModel(patch_size=1, **config)  # type: ignore[arg-type]
    return model.to(device=device, dtype=dtype).eval()


def make_loop(model: torch.nn.Module, steps: int, image_tokens: int, text_tokens: int, device: str,
              dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    side = int(image_tokens ** 0.5)
    img_ids = torch.zeros(side * side, 3)
    img_ids[:, 1] = torch.arange(side * side) // side
    img_ids[:, 2] = torch.arange(side * side) % side
    inputs = {
        "encoder_hidden_states": torch.randn(1, text_tokens, cfg.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(text_tokens, 3),
    }
    inputs = {k: v.to(device=device, dtype=dtype if v.is_floating_point() and k != "img_ids" else v.dtype)
              for k, v in inputs.items()}
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((1,), 3.5, device=device, dtype=dtype)
    start = torch.randn(1, side * side, cfg.in_channels, generator=g).to(device=device, dtype=dtype)

    def loop() -> torch.Tensor:
        scheduler = FlowMatchEulerDiscreteScheduler()
        scheduler.set_timesteps(steps, device=device)
        latents = start
        with torch.no_grad():
            for t in scheduler.timesteps:
                timestep = t.expand(1).to(dtype) / 1000
                pred = model(hidden_states=latents, timestep=timestep, return_dict=False, **inputs)[0]
                latents = scheduler.step(pred, t, latents, return_dict=False)[0]
        if device == "cuda":
            torch.cuda.synchronize()
        return latents

    return loop


def timed(fn: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="FLUX.1-dev architecture (needs a GPU)")
    parser.add_argument("--tiny", action="store_true",
                        help="a 2+2-block model on 16 tokens: the blocks cost little, so the table shows hook overhead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--image-tokens", type=int, default=None, help="default: 1024 (mid), 4096 (full)")
    parser.add_argument("--text-tokens", type=int, default=None, help="default: 64 (mid), 512 (full)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU); fewer = steadier timings")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer for every method")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = "full" if args.full else "tiny" if args.tiny else "mid"
    image_tokens = args.image_tokens or {"full": 4096, "mid": 1024, "tiny": 16}[size]
    text_tokens = args.text_tokens or {"full": 512, "mid": 64, "tiny": 6}[size]
    base = build(size, args.device, dtype)

    curves = {
        "skips nothing (K=0)": dict(threshold=0.06, max_skip_steps=0, retention_ratio=0.2),
        "FLUX curve 0.06/3/0.2": dict(threshold=0.06, max_skip_steps=3, retention_ratio=0.2),
        "FLUX curve 0.24/5/0.1": dict(threshold=0.24, max_skip_steps=5, retention_ratio=0.1),
    }
    print(f"# device={args.device} dtype={args.dtype} model={size} steps={args.steps} "
          f"image_tokens={image_tokens} text_tokens={text_tokens} rounds={args.rounds} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    plain_model = base
    methods: dict[str, Callable[[], torch.Tensor]] = {}
    computed: dict[str, int] = {}
    for label, settings in curves.items():
        ours = copy.deepcopy(base)
        handle = magsdk.enable(ours, magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, **settings))
        theirs = copy.deepcopy(base)
        apply_mag_cache(theirs, DiffusersMagCacheConfig(mag_ratios=FLUX_RATIOS, num_inference_steps=args.steps,
                                                        **settings))
        if args.compile:
            ours.compile()
            theirs.compile()
        methods[f"magsdk | {label}"] = make_loop(ours, args.steps, image_tokens, text_tokens, args.device, dtype)
        methods[f"diffusers | {label}"] = make_loop(theirs, args.steps, image_tokens, text_tokens, args.device,
                                                    dtype)
        computed[label] = len(handle.plan(args.steps).computed_steps)
    if args.compile:
        plain_model.compile()
    plain = make_loop(plain_model, args.steps, image_tokens, text_tokens, args.device, dtype)

    for fn in [plain, *methods.values()]:  # warm-up (and compilation)
        fn()
    times: dict[str, list[float]] = {"plain": [], **{name: [] for name in methods}}
    for _ in range(args.rounds):
        times["plain"].append(timed(plain))
        for name, fn in methods.items():
            times[name].append(timed(fn))
            times["plain"].append(timed(plain))
    plain_s = min(times["plain"])
    print("| method | curve | computed / total | best time per generation (s) | speedup | ideal (s) | time / ideal |")
    print("|---|---|---|---|---|---|---|")
    print(f"| plain | - | {args.steps} / {args.steps} | {plain_s:.3f} | 1.00x | {plain_s:.3f} | 1.000 |")
    for name, values in times.items():
        if name == "plain":
            continue
        method, label = name.split(" | ")
        seconds = min(values)
        ideal = plain_s * computed[label] / args.steps
        print(f"| {method} | {label} | {computed[label]} / {args.steps} | {seconds:.3f} | "
              f"{plain_s / seconds:.2f}x | {ideal:.3f} | {seconds / ideal:.3f} |")
    if computed:
        label = next(iter(curves))
        for method in ("magsdk", "diffusers"):
            extra = (min(times[f"{method} | {label}"]) - plain_s) / args.steps * 1e6
            print(f"# {method}: {extra:+.0f} us per transformer call over plain ({label})")


if __name__ == "__main__":
    main()
