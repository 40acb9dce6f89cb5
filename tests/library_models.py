"""Tiny real diffusers pipelines for the strategy library tests (random weights, no tokenizers, no network).

Each builder returns a real pipeline of the class a published model runs in, with a tiny transformer
of the real class, a tiny VAE where the pipeline needs one, and no text encoder: the calls pass
``prompt_embeds`` instead. ``name`` is recorded as ``_name_or_path`` exactly as ``from_pretrained``
records the folder or hub id a pipeline was loaded from.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    HunyuanVideoFramepackPipeline,
    HunyuanVideoFramepackTransformer3DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    QwenImageEditPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers_features import FLUX2, require

Built = tuple[Any, dict[str, Any]]


def named(pipe: Any, name: str | None) -> Any:
    if name is not None:
        pipe.register_to_config(_name_or_path=name)  # what DiffusionPipeline.from_pretrained records
    return pipe


def image(side: int = 16) -> PIL.Image.Image:
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))


def _seeded() -> torch.Generator:
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)


# -- FLUX.1 / FLUX.1-Kontext ------------------------------------------------------------------------
def _flux_parts() -> dict[str, Any]:
    _seeded()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=[2, 2, 4],
        guidance_embeds=True,
    )
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], latent_channels=4,
                        norm_num_groups=4, layers_per_block=1, shift_factor=0.0, scaling_factor=1.0)
    return {"transformer": transformer.eval(), "vae": vae.eval(), "scheduler": FlowMatchEulerDiscreteScheduler(),
            "text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None}


def _flux_prompt() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {"prompt_embeds": torch.randn(1, 6, 16, generator=g), "pooled_prompt_embeds": torch.randn(1, 8, generator=g)}


def flux(name: str | None = None) -> Built:
    pipe = named(FluxPipeline(**_flux_parts()), name)
    return pipe, {**_flux_prompt(), "height": 16, "width": 16, "guidance_scale": 3.5, "output_type": "latent"}


def flux_kontext(name: str | None = None) -> Built:
    pipe = named(FluxKontextPipeline(**_flux_parts(), image_encoder=None, feature_extractor=None), name)
    return pipe, {**_flux_prompt(), "image": image(16), "height": 16, "width": 16, "guidance_scale": 2.5,
                  "max_area": 16 * 16, "_auto_resize": False, "output_type": "latent"}


# -- FLUX.2-klein -----------------------------------------------------------------------------------
def flux2_klein(name: str | None = None) -> Built:
    """Skips the calling test on a diffusers without FLUX.2 (0.36) or its Klein pipeline (0.37)."""
    Flux2Transformer2DModel = require("diffusers.Flux2Transformer2DModel", FLUX2)
    AutoencoderKLFlux2 = require("diffusers.AutoencoderKLFlux2", FLUX2)
    Flux2KleinPipeline = require("diffusers.Flux2KleinPipeline", "Flux2KleinPipeline (added in 0.37.0)")
    _seeded()
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 2, 2), timestep_guidance_channels=8,
        mlp_ratio=2.0, guidance_embeds=False,
    )
    vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4, layers_per_block=1)
    pipe = named(Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=None,
                                    tokenizer=None, transformer=transformer.eval(), is_distilled=True), name)
    g = torch.Generator().manual_seed(1)
    return pipe, {"prompt_embeds": torch.randn(1, 6, 16, generator=g), "height": 16, "width": 16,
                  "output_type": "latent"}


# -- Wan2.1 / Wan2.2 --------------------------------------------------------------------------------
def wan(name: str | None = None, *, image_to_video: bool = False, in_channels: int = 16, image_dim: int | None = None,
        two_transformers: bool = False, boundary_ratio: float | None = None, expand_timesteps: bool = False) -> Built:
    _seeded()

    def transformer() -> WanTransformer3DModel:
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=in_channels,
            out_channels=16 if in_channels == 36 else in_channels, text_dim=16, freq_dim=16, ffn_dim=32,
            num_layers=2, rope_max_seq_len=32,
            image_dim=image_dim, added_kv_proj_dim=16 if image_dim else None,
        ).eval()

    z_dim = 48 if in_channels == 48 else 16  # Wan2.2 TI2V-5B's VAE has 48 latent channels
    vae = AutoencoderKLWan(base_dim=8, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * z_dim,
                           latents_std=[1.0] * z_dim).eval()
    parts: dict[str, Any] = {
        "tokenizer": None, "text_encoder": None, "vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler(shift=5.0),
        "transformer": transformer(), "transformer_2": transformer() if two_transformers else None,
        "boundary_ratio": boundary_ratio, "expand_timesteps": expand_timesteps,
    }
    g = torch.Generator().manual_seed(1)
    call: dict[str, Any] = {"prompt_embeds": torch.randn(1, 8, 16, generator=g),
                            "negative_prompt_embeds": torch.randn(1, 8, 16, generator=g),
                            "height": 16, "width": 16, "num_frames": 5, "guidance_scale": 5.0, "output_type": "latent"}
    if image_to_video:
        encoder, processor = _clip_image_encoder(image_dim) if image_dim else (None, None)
        pipe = WanImageToVideoPipeline(**parts, image_processor=processor, image_encoder=encoder)
        call["image"] = image(16)
    else:
        pipe = WanPipeline(**parts)
    return named(pipe, name), call


def _clip_image_encoder(width: int) -> tuple[Any, Any]:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=16, patch_size=8))
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return encoder.eval(), processor


# -- Qwen-Image -------------------------------------------------------------------------------------
def qwen_image(name: str | None = None, *, edit: bool = False) -> Built:
    _seeded()
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 6, 6),
    ).eval()
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True]).eval()
    g = torch.Generator().manual_seed(1)
    call: dict[str, Any] = {
        "prompt_embeds": torch.randn(1, 6, 16, generator=g), "prompt_embeds_mask": torch.ones(1, 6, dtype=torch.long),
        "negative_prompt_embeds": torch.randn(1, 6, 16, generator=g),
        "negative_prompt_embeds_mask": torch.ones(1, 6, dtype=torch.long),
        "true_cfg_scale": 4.0, "height": 32, "width": 32, "output_type": "latent",
    }
    parts = {"scheduler": FlowMatchEulerDiscreteScheduler(), "vae": vae, "text_encoder": None, "tokenizer": None,
             "transformer": transformer}
    if edit:
        pipe = QwenImageEditPipeline(**parts, processor=None)
        call["image"] = image(32)
    else:
        pipe = QwenImagePipeline(**parts)
    return named(pipe, name), call


# -- HunyuanVideo / FramePack -----------------------------------------------------------------------
def _hunyuan_vae() -> AutoencoderKLHunyuanVideo:
    return AutoencoderKLHunyuanVideo(
        latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, mid_block_add_attention=False,
    ).eval()


def _hunyuan_prompt() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {"prompt_embeds": torch.randn(1, 6, 16, generator=g), "pooled_prompt_embeds": torch.randn(1, 8, generator=g),
            "prompt_attention_mask": torch.ones(1, 6, dtype=torch.long)}


_HUNYUAN = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1,
                text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))


def hunyuan_video(name: str | None = None) -> Built:
    _seeded()
    transformer = HunyuanVideoTransformer3DModel(**_HUNYUAN).eval()
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=_hunyuan_vae(),
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                tokenizer_2=None)
    return named(pipe, name), {**_hunyuan_prompt(), "height": 16, "width": 16, "num_frames": 1,
                               "guidance_scale": 6.0, "output_type": "latent"}


def framepack(name: str | None = None) -> Built:
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    _seeded()
    # FramePack's history embedders downsample the clean latents 2x and 4x beyond the main patch (2x2).
    config = {**_HUNYUAN, "patch_size": 2}
    transformer = HunyuanVideoFramepackTransformer3DModel(**config, image_proj_dim=16, has_image_proj=True,
                                                          has_clean_x_embedder=True).eval()
    encoder = SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=16, patch_size=8)).eval()
    processor = SiglipImageProcessor(size={"height": 16, "width": 16})
    pipe = HunyuanVideoFramepackPipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=_hunyuan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), text_encoder_2=None, tokenizer_2=None,
        image_encoder=encoder, feature_extractor=processor,
    )
    return named(pipe, name), {**_hunyuan_prompt(), "image": image(64), "height": 64, "width": 64,
                               "num_frames": 5, "latent_window_size": 2, "guidance_scale": 10.0,
                               "output_type": "latent"}
