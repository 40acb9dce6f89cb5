"""Build every component of a small, real diffusers ``FluxPipeline`` locally (no hub).

Tokenizers are made from the words the prompts use, so the pipeline saves with
``save_pretrained`` and loads with ``DiffusionPipeline.from_pretrained(folder)`` and no custom
code. Used by the tests (random weights) and by ``tools/train_reference.py`` (trained).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
BASE_WORDS = ("a", "handwritten", "digit", "number", "photo", "of", "the", "image", "drawing", "blurry", "sharp")


def vocabulary(extra: Iterable[str] = ()) -> list[str]:
    words: dict[str, None] = {}
    for word in (*BASE_WORDS, *DIGIT_WORDS, *extra):
        words.setdefault(word.lower(), None)
    return list(words)


def clip_tokenizer(words: list[str], max_length: int = 16) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges spell each word as one token."""
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for byte_char in "abcdefghijklmnopqrstuvwxyz0123456789":
        add(byte_char)
        add(byte_char + "</w>")
    for word in words:
        pieces = [*list(word[:-1]), word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            add(pieces[0])
    add("<|startoftext|>")
    add("<|endoftext|>")
    merges = list(dict.fromkeys(merges))
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = max_length
    return tok


def t5_tokenizer(words: list[str], max_length: int = 16) -> T5Tokenizer:
    """A unigram T5 tokenizer with one piece per word (plus '▁'-prefixed forms)."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    for word in words:
        pieces.append(("▁" + word, -1.0))
    for char in "abcdefghijklmnopqrstuvwxyz0123456789▁":
        pieces.append((char, -10.0))
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.model_max_length = max_length
    return tok


@dataclass(frozen=True)
class PipelineSizes:
    """Widths of the components. The defaults make a pipeline of a few MB."""

    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (32, 64)
    text_dim: int = 32
    text_layers: int = 2
    t5_dim: int = 32
    t5_layers: int = 2
    heads: int = 2
    head_dim: int = 16
    double_layers: int = 2
    single_layers: int = 2
    max_text_tokens: int = 16
    image_size: int = 32


# The trained reference (``magsdk/reference/flux-digits``): a three-level VAE turns a 32x32 image
# into an 8x8x4 latent, so the transformer sees 16 packed image tokens; small enough to train on
# two CPU cores in minutes, deep enough (2 double + 4 single blocks) for caching to matter.
REFERENCE_SIZES = PipelineSizes(
    latent_channels=4, vae_channels=(16, 32, 32), text_dim=32, text_layers=2, t5_dim=32, t5_layers=2,
    heads=4, head_dim=16, double_layers=2, single_layers=4, max_text_tokens=16, image_size=32,
)


def build_pipeline(seed: int = 0, sizes: PipelineSizes | None = None, extra_words: Iterable[str] = ()) -> FluxPipeline:
    """A FluxPipeline from real diffusers / transformers classes with random weights."""
    s = sizes or PipelineSizes()
    words = vocabulary(extra_words)
    torch.manual_seed(seed)
    clip_tok = clip_tokenizer(words, s.max_text_tokens)
    t5_tok = t5_tokenizer(words, s.max_text_tokens)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=s.text_dim, intermediate_size=2 * s.text_dim,
            num_hidden_layers=s.text_layers, num_attention_heads=2, max_position_embeddings=s.max_text_tokens,
            projection_dim=s.text_dim, bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok), d_model=s.t5_dim, d_kv=s.t5_dim // 2, d_ff=2 * s.t5_dim,
            num_layers=s.t5_layers, num_heads=2, relative_attention_num_buckets=8,
            decoder_start_token_id=0, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=s.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * len(s.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(s.vae_channels),
        block_out_channels=s.vae_channels, layers_per_block=1, norm_num_groups=min(32, s.vae_channels[0]),
        sample_size=s.image_size, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0,
    )
    rope = s.head_dim // 4
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * s.latent_channels, num_layers=s.double_layers,
        num_single_layers=s.single_layers, attention_head_dim=s.head_dim, num_attention_heads=s.heads,
        joint_attention_dim=s.t5_dim, pooled_projection_dim=s.text_dim,
        axes_dims_rope=(rope, rope, s.head_dim - 2 * rope),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    for module in (vae, text_encoder, text_encoder_2, transformer):
        module.eval()  # as from_pretrained gives them: no dropout, so generations are reproducible
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tok,
        text_encoder_2=text_encoder_2, tokenizer_2=t5_tok, transformer=transformer,
    )
