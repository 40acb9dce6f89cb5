"""MagCache strategy for ``Flux2Transformer2DModel`` (FLUX.2, FLUX.2-klein).

The 28-step curve is FLUX.2-klein-4B's, published in vllm-project/vllm-omni PR #1287
(vllm_omni/diffusion/cache/magcache/strategy.py, FLUX2_MAG_RATIOS). Flux2's single-stream
blocks take and return one fused [text; image] sequence: the residual is taken over the
image tokens at the end of that sequence (``fused_sequence_order="text_image"``).
"""

from __future__ import annotations

from typing import Any

from magsdk import BlockMetadata, MagCacheStrategy, load_calibrations

# Calibrations: rewritten by `magsdk calibrate`; everything else in this file is yours to edit.
CALIBRATIONS: list[dict[str, Any]] = [
    {
        "num_steps": 28,
        "source": "vllm-project/vllm-omni PR #1287, FLUX2_MAG_RATIOS (FLUX.2-klein-4B)",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
        "synthetic": False,
        "branches": {
            "default": [
                1.0, 0.96528, 1.11559, 1.0565, 1.00425, 1.0805, 0.98616, 1.09289, 1.03196, 1.06679,
                1.03941, 1.05375, 1.03128, 1.05349, 1.01983, 1.05535, 1.0662, 1.05748, 1.00318, 1.05222,
                1.04556, 1.0506, 1.05058, 1.05219, 1.02025, 1.05052, 1.04143, 1.0498,
            ],
        },
    },
]


class Flux2KleinStrategy(MagCacheStrategy):
    transformer_cls_name = "Flux2Transformer2DModel"
    block_groups = ("transformer_blocks", "single_transformer_blocks")
    block_metadata = {
        "Flux2TransformerBlock": BlockMetadata(
            hidden_states_argument_name="hidden_states",
            encoder_hidden_states_argument_name="encoder_hidden_states",
            return_hidden_states_index=1,
            return_encoder_hidden_states_index=0,
            output_kind="tuple",
        ),
        "Flux2SingleTransformerBlock": BlockMetadata(
            hidden_states_argument_name="hidden_states",
            encoder_hidden_states_argument_name="encoder_hidden_states",
            return_hidden_states_index=0,
            return_encoder_hidden_states_index=None,
            output_kind="tensor",
            fused_sequence_order="text_image",
            fuses_inputs=True,
        ),
    }
    threshold = 0.06
    max_skip_steps = 3
    retention_ratio = 0.2
    calibrations = load_calibrations(CALIBRATIONS)
