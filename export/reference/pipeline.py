"""Reference end-to-end image chat: preprocess -> vision -> resampler -> splice -> greedy decode."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..hf_config import MiniCPMOConfig
from .decoder import decoder_forward, embed, greedy_generate
from .preprocess import preprocess_images
from .prompt import Prompt, build_prompt, stop_ids
from .resampler import resampler_forward
from .vision import siglip_forward


def reference_image_embeds(weights: Mapping[str, torch.Tensor], cfg: MiniCPMOConfig,
                           images: Sequence[Image.Image]) -> torch.Tensor:
    """All slices of all images, in order -> resampler output [n_slices, query_num, hidden]."""
    strips, tgt_sizes, _ = preprocess_images(list(images), cfg)
    features = siglip_forward(weights, cfg, strips, tgt_sizes)
    return resampler_forward(weights, cfg, features, tgt_sizes)


def splice(text_embeds: torch.Tensor, image_embeds: torch.Tensor,
           bounds: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Write image_embeds [n, Q, D] (flattened to [n*Q, D]) into the bound positions of [1, T, D]."""
    rows = image_embeds.reshape(-1, image_embeds.shape[-1])
    index = [i for start, end in bounds for i in range(start, end)]
    if len(index) != rows.shape[0]:
        raise ValueError(f"{len(index)} placeholder positions but {rows.shape[0]} image embedding rows")
    out = text_embeds.clone()
    if index:
        out[0, torch.tensor(index)] = rows
    return out


def reference_inputs_embeds(weights: Mapping[str, torch.Tensor], cfg: MiniCPMOConfig,
                            prompt: Prompt) -> torch.Tensor:
    """Token embeddings of the prompt with every image slice spliced in: [1, T, hidden]."""
    text = embed(weights, prompt.ids)
    if not prompt.images:
        return text
    return splice(text, reference_image_embeds(weights, cfg, prompt.images), prompt.image_bounds)


def reference_prefill_logits(weights: Mapping[str, torch.Tensor], cfg: MiniCPMOConfig,
                             tokenizer_dir: str | Path, messages: Sequence[dict[str, Any]]
                             ) -> tuple[Prompt, torch.Tensor]:
    """The prompt and its full logits [1, T, V]."""
    prompt = build_prompt(tokenizer_dir, messages, cfg)
    return prompt, decoder_forward(weights, cfg, reference_inputs_embeds(weights, cfg, prompt))


@torch.no_grad()
def reference_chat(weights: Mapping[str, torch.Tensor], cfg: MiniCPMOConfig, tokenizer_dir: str | Path,
                   messages: Sequence[dict[str, Any]], max_new_tokens: int = 32) -> dict[str, Any]:
    """Greedy image chat. Returns prompt_ids, image_bounds and output_ids (stop token included if hit).

    Upstream equivalent: chat(..., sampling=False, num_beams=1, repetition_penalty=1.0).
    """
    prompt = build_prompt(tokenizer_dir, messages, cfg)
    embeds = reference_inputs_embeds(weights, cfg, prompt)
    output = greedy_generate(weights, cfg, embeds, max_new_tokens, stop_ids(tokenizer_dir))
    return {"prompt_ids": prompt.ids, "image_bounds": prompt.image_bounds, "output_ids": output}
