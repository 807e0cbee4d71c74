"""Independent eager-PyTorch reference of MiniCPM-o 2.6 image-chat inference (the parity yardstick).

Float32, plain functions over a weight dict with the upstream names (`llm.*`, `vpm.*`, `resampler.*`).
Never imported by the runtime.
"""

from .decoder import decoder_forward, embed, greedy_generate
from .pipeline import (
    reference_chat,
    reference_image_embeds,
    reference_inputs_embeds,
    reference_prefill_logits,
)
from .preprocess import image_placeholder, preprocess_images
from .prompt import build_prompt
from .resampler import get_2d_sincos_pos_embed, resampler_forward
from .vision import siglip_forward
from .weights import load_weights

__all__ = [
    "build_prompt", "decoder_forward", "embed", "get_2d_sincos_pos_embed", "greedy_generate",
    "image_placeholder", "load_weights", "preprocess_images", "reference_chat", "reference_image_embeds",
    "reference_inputs_embeds", "reference_prefill_logits", "resampler_forward", "siglip_forward",
]
