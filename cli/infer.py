"""`minicpmo infer`: one user turn (images first, then the text, as upstream chat() joins them)."""

from __future__ import annotations

import json
import sys

import click

from ..runtime.pipeline import Pipeline
from ..runtime.preprocess.image import load_image
from ..runtime.types import GenerationParams


def run_infer(*, model, provider, threads, context_length, images, prompt, system, as_json, sampling) -> None:
    decoded = [load_image(src) for src in images]  # fail on a bad image before loading the model
    pipe = Pipeline.load(model, provider=provider, threads=threads, context_length=context_length)
    content = [{"type": "image", "image": img} for img in decoded] + [{"type": "text", "text": prompt}]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    text, ids, usage = [], [], None
    for chunk in pipe.generate(messages, GenerationParams(**sampling)):
        ids += chunk.token_ids
        if chunk.text:
            text.append(chunk.text)
            if not as_json:
                click.echo(chunk.text, nl=False)
        if chunk.usage:
            usage = chunk.usage
    if as_json:
        click.echo(json.dumps({"text": "".join(text), "token_ids": ids,
                               "prompt_token_ids": pipe.last_prompt_ids, "usage": usage.as_dict()}))
    else:
        click.echo()
        u = usage.as_dict()
        click.echo(f"[{u['prompt_tokens']} prompt tokens, {u['completion_tokens']} generated; "
                   f"prefill {u['prefill_tokens_per_s']:.1f} tok/s, decode {u['decode_tokens_per_s']:.1f} tok/s]",
                   err=True)
    sys.stdout.flush()
