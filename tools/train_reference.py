"""Train the bundled reference FluxPipeline on scikit-learn's digits, on CPU, in minutes.

    nice -n 10 python tools/train_reference.py            # writes magsdk/reference/flux-digits/

1. An ``AutoencoderKL`` learns the 32x32 renders of the digits (L1 + a light KL term); its
   latents' mean and spread become the VAE's ``shift_factor`` / ``scaling_factor``.
2. The text encoders stay as initialised (random but distinct per prompt) and frozen.
3. The ``FluxTransformer2DModel`` learns rectified flow exactly as ``FluxPipeline`` samples it:
   packed 2x2 latent patches, ``img_ids``/``txt_ids`` from the pipeline's own helpers,
   ``x_t = (1 - t) x0 + t noise``, target ``noise - x0``, timestep ``t`` (= sigma; the pipeline
   passes ``timestep / 1000``), 10% of captions replaced by "" so that true CFG works.
4. The EMA weights are saved with ``save_pretrained`` (safetensors) plus ``reference.json``, and a
   sample grid and the classifier accuracy are reported.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from magsdk.config import atomic_write_text  # noqa: E402
from magsdk.reference import (  # noqa: E402
    DEFAULT_PROMPTS,
    SETTINGS_FILE,
    ReferenceSettings,
    generate,
    image_grid,
    load_reference_pipeline,
)
from magsdk.reference.classifier import digit_classifier  # noqa: E402
from magsdk.reference.components import REFERENCE_SIZES, build_pipeline  # noqa: E402
from magsdk.reference.digits import EXTRA_TEMPLATES, PROMPT_TEMPLATE, caption, load_digits_data, render  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cosine_lr(step: int, total: int, base: float, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(vae: Any, images: torch.Tensor, epochs: int, batch: int, lr: float, kl_weight: float) -> dict[str, float]:
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(images) / batch)
    total = epochs * steps_per_epoch
    step = 0
    g = torch.Generator().manual_seed(1)
    rec = kl = float("nan")
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=g)
        rec_sum = kl_sum = 0.0
        for i in range(steps_per_epoch):
            x = images[order[i * batch : (i + 1) * batch]]
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, total, lr, warmup=50)
            posterior = vae.encode(x).latent_dist
            out = vae.decode(posterior.sample()).sample
            rec_loss = (out - x).abs().mean()
            kl_loss = posterior.kl().mean() / posterior.mean[0].numel()
            loss = rec_loss + kl_weight * kl_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            rec_sum += rec_loss.item()
            kl_sum += kl_loss.item()
            step += 1
        rec, kl = rec_sum / steps_per_epoch, kl_sum / steps_per_epoch
        if epoch % 5 == 0 or epoch == epochs - 1:
            log(f"vae epoch {epoch + 1}/{epochs}: L1 {rec:.4f}  KL/elem {kl:.3f}")
    vae.eval()
    with torch.no_grad():
        out = torch.cat([vae.decode(vae.encode(images[i : i + 256]).latent_dist.mode()).sample
                         for i in range(0, len(images), 256)])
    mse = F.mse_loss(out.clamp(-1, 1), images).item()
    psnr = 10 * math.log10(4.0 / mse)  # range [-1, 1] spans 2
    log(f"vae reconstruction of the whole set: PSNR {psnr:.2f} dB")
    return {"vae_l1": rec, "vae_kl_per_element": kl, "vae_recon_psnr_db": psnr}


def encode_latents(vae: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        means, stds = [], []
        for i in range(0, len(images), 256):
            d = vae.encode(images[i : i + 256]).latent_dist
            means.append(d.mean)
            stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def text_table(pipe: Any, prompts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings of every caption, computed by the pipeline itself (frozen encoders)."""
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=max_len)
    return embeds, pooled, text_ids


def train_flow(pipe: Any, latent_mean: torch.Tensor, latent_std: torch.Tensor, labels: np.ndarray,
               args: argparse.Namespace, settings: ReferenceSettings) -> tuple[Any, dict[str, float]]:
    transformer = pipe.transformer
    vae_cfg = pipe.vae.config
    shift, scale = float(vae_cfg.shift_factor), float(vae_cfg.scaling_factor)
    n, c, h, w = latent_mean.shape
    image_ids = pipe._prepare_latent_image_ids(n, h // 2, w // 2, "cpu", torch.float32)

    # Caption table: index [template][digit]; the last row holds the empty (dropped) caption.
    templates = [PROMPT_TEMPLATE, *EXTRA_TEMPLATES]
    captions = [caption(d, t) for t in templates for d in range(10)] + [""]
    embeds, pooled, text_ids = text_table(pipe, captions, settings.max_sequence_length)
    empty = len(captions) - 1
    labels_t = torch.as_tensor(labels)

    ema = copy.deepcopy(transformer).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    transformer.train()
    opt = torch.optim.AdamW(transformer.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(2)
    losses: list[float] = []
    for step in range(args.flow_steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.flow_steps, args.lr, warmup=200)
        idx = torch.randint(0, n, (args.batch,), generator=g)
        z = latent_mean[idx] + latent_std[idx] * torch.randn(args.batch, c, h, w, generator=g)
        x0 = pipe._pack_latents((z - shift) * scale, args.batch, c, h, w)
        noise = torch.randn(x0.shape, generator=g)
        # half uniform, half logit-normal: every sigma is seen, the middle ones (hardest) more often
        t_uniform = torch.rand(args.batch, generator=g)
        t_logit = torch.sigmoid(torch.randn(args.batch, generator=g))
        t = torch.where(torch.rand(args.batch, generator=g) < 0.5, t_uniform, t_logit).clamp(1e-3, 1.0)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        template = torch.where(torch.rand(args.batch, generator=g) < 0.7, 0,
                               torch.randint(1, len(templates), (args.batch,), generator=g))
        cap = template * 10 + labels_t[idx]
        cap = torch.where(torch.rand(args.batch, generator=g) < args.caption_dropout, empty, cap)
        pred = transformer(
            hidden_states=xt, timestep=t, guidance=None, pooled_projections=pooled[cap],
            encoder_hidden_states=embeds[cap], txt_ids=text_ids, img_ids=image_ids, return_dict=False,
        )[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pt in zip(ema.parameters(), transformer.parameters(), strict=True):
                pe.lerp_(pt, 1 - decay)
        losses.append(loss.item())
        if step % 100 == 0 or step == args.flow_steps - 1:
            lr = opt.param_groups[0]["lr"]
            log(f"flow step {step + 1}/{args.flow_steps}: loss {np.mean(losses[-100:]):.4f}  lr {lr:.2e}")
    transformer.load_state_dict(ema.state_dict())
    transformer.eval()
    stats = {"flow_loss_last100": float(np.mean(losses[-100:])), "flow_loss_first100": float(np.mean(losses[:100]))}
    return transformer, stats


def held_out_flow_loss(pipe: Any, latent_mean: torch.Tensor, labels: np.ndarray, max_len: int) -> float:
    """The EMA model's flow loss on fixed noise and sigmas (a number that does not depend on the batch draw)."""
    g = torch.Generator().manual_seed(123)
    idx = torch.randperm(len(latent_mean), generator=g)[:512]
    vae_cfg = pipe.vae.config
    n, c, h, w = len(idx), *latent_mean.shape[1:]
    x0 = pipe._pack_latents((latent_mean[idx] - vae_cfg.shift_factor) * vae_cfg.scaling_factor, n, c, h, w)
    noise = torch.randn(x0.shape, generator=g)
    t = (torch.arange(n) + 0.5) / n
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    embeds, pooled, text_ids = text_table(pipe, [caption(int(labels[i])) for i in idx], max_len)
    ids = pipe._prepare_latent_image_ids(n, h // 2, w // 2, "cpu", torch.float32)
    with torch.no_grad():
        pred = pipe.transformer(hidden_states=xt, timestep=t, guidance=None, pooled_projections=pooled,
                                encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
    return float(F.mse_loss(pred, noise - x0))


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "magsdk" / "reference" / "flux-digits")
    parser.add_argument("--grid", type=Path, default=None,
                        help="sample grid PNG (default: docs/img/reference-grid.png for the shipped folder, "
                        "else OUT-grid.png next to --out, so a trial run leaves the checkout alone)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-epochs", type=int, default=12)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-3)
    parser.add_argument("--flow-steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=28, help="default inference steps recorded for the model")
    parser.add_argument("--cfg", type=float, default=3.0, help="default true CFG scale recorded for the model")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    cpu_started = time.process_time()
    sizes = REFERENCE_SIZES
    settings = ReferenceSettings(height=sizes.image_size, width=sizes.image_size, num_inference_steps=args.steps,
                                 true_cfg_scale=args.cfg, max_sequence_length=sizes.max_text_tokens)

    ink, labels = load_digits_data()
    images = render(ink, sizes.image_size)
    log(f"data: {len(images)} digits rendered at {sizes.image_size}x{sizes.image_size}")
    pipe = build_pipeline(seed=args.seed, sizes=sizes)
    for module in (pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False).eval()

    t0, c0 = time.perf_counter(), time.process_time()
    vae_stats = train_vae(pipe.vae, images, args.vae_epochs, 64, args.vae_lr, args.kl_weight)
    vae_seconds, vae_cpu = time.perf_counter() - t0, time.process_time() - c0
    pipe.vae.requires_grad_(False)
    latent_mean, latent_std = encode_latents(pipe.vae, images)
    shift = float(latent_mean.mean())
    spread = float((latent_mean - shift).pow(2).add(latent_std.pow(2)).mean().sqrt())
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / spread)
    log(f"vae latents: shift_factor {shift:.4f}, scaling_factor {1 / spread:.4f}  ({vae_seconds:.0f} s)")

    t0, c0 = time.perf_counter(), time.process_time()
    _, flow_stats = train_flow(pipe, latent_mean, latent_std, labels, args, settings)
    flow_seconds, flow_cpu = time.perf_counter() - t0, time.process_time() - c0
    eval_loss = held_out_flow_loss(pipe, latent_mean, labels, settings.max_sequence_length)
    log(f"flow training done in {flow_seconds:.0f} s; fixed-draw flow loss (EMA) {eval_loss:.4f}")

    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(str(out), safe_serialization=True)
    params = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    training = {
        "command": " ".join(["nice -n 10 python tools/train_reference.py", *(sys.argv[1:] if argv is None else argv)]),
        "seed": args.seed, "vae_epochs": args.vae_epochs, "flow_steps": args.flow_steps, "batch": args.batch,
        "lr": args.lr, "ema": args.ema, "caption_dropout": args.caption_dropout, "kl_weight": args.kl_weight,
        "threads": args.threads, "vae_seconds": round(vae_seconds, 1), "flow_seconds": round(flow_seconds, 1),
        "vae_cpu_seconds": round(vae_cpu, 1), "flow_cpu_seconds": round(flow_cpu, 1),
        **{k: round(v, 5) for k, v in vae_stats.items()}, **{k: round(v, 5) for k, v in flow_stats.items()},
        "flow_loss_fixed_draw_ema": round(eval_loss, 5), "parameters": params,
    }
    settings.training = training
    atomic_write_text(out / SETTINGS_FILE, json.dumps(settings.model_dump(), indent=2) + "\n")

    # Check what was saved, through the public loader, the way users will run it.
    loaded = load_reference_pipeline(out)
    t0 = time.perf_counter()
    seeds = list(range(8))
    samples = generate(loaded, DEFAULT_PROMPTS, seeds)
    sample_seconds = time.perf_counter() - t0
    clf = digit_classifier(sizes.image_size)
    prompts = [p for p in DEFAULT_PROMPTS for _ in seeds]
    accuracy = clf.prompt_accuracy(samples, prompts)
    per_cfg = {}
    for cfg in (1.0, 2.0, 4.0, 6.0):
        imgs = generate(loaded, DEFAULT_PROMPTS, seeds, true_cfg_scale=cfg)
        per_cfg[str(cfg)] = round(clf.prompt_accuracy(imgs, prompts), 4)
    log(f"classifier accuracy on {len(prompts)} samples: {accuracy:.3f} (cfg sweep {per_cfg}); "
        f"sampling took {sample_seconds:.1f} s")
    shipped = out.resolve() == (ROOT / "magsdk" / "reference" / "flux-digits").resolve()
    grid: Path = args.grid or (ROOT / "docs" / "img" / "reference-grid.png" if shipped
                               else out.with_name(f"{out.name}-grid.png"))
    grid.parent.mkdir(parents=True, exist_ok=True)
    image_grid(samples, columns=len(seeds), scale=2).save(grid)
    log(f"sample grid: {grid}")

    training.update({
        "total_seconds": round(time.perf_counter() - started, 1),
        "total_cpu_seconds": round(time.process_time() - cpu_started, 1),
        "classifier_accuracy": round(accuracy, 4), "classifier_accuracy_by_cfg": per_cfg,
        "classifier_holdout_accuracy_on_real_digits": round(clf.holdout_accuracy, 4),
        "folder_bytes": folder_size(out),
    })
    settings.training = training
    atomic_write_text(out / SETTINGS_FILE, json.dumps(settings.model_dump(), indent=2) + "\n")
    log(json.dumps(training, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
