"""`minicpmo infer`: one user turn holding the images, then the video frames, then the audio clips,
then the text (upstream chat() joins a content list [image, audio, text] in that order)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import click

from ..runtime.pipeline import Pipeline
from ..runtime.preprocess.image import load_image
from ..runtime.types import GenerationParams


@dataclass
class MediaArgs:
    images: tuple[str, ...] = ()
    audios: tuple[str, ...] = ()
    video: str | None = None
    frames: str | None = None
    fps: float = 1.0
    max_frames: int = 64


def media_parts(media: MediaArgs) -> list[dict]:
    """Decode every input up front, so a bad file fails before the model loads."""
    parts = [{"type": "image", "image": load_image(src)} for src in media.images]
    if media.video or media.frames:
        from ..runtime.preprocess.video import load_frame_dir, load_video

        frames = (load_video(media.video, fps=media.fps, max_frames=media.max_frames) if media.video
                  else load_frame_dir(media.frames, max_frames=media.max_frames))
        parts.append({"type": "video", "frames": frames})
    if media.audios:
        from ..runtime.preprocess.audio import load_audio

        parts += [{"type": "audio", "audio": load_audio(src)} for src in media.audios]
    return parts


def run_infer(*, model, provider, threads, context_length, media: MediaArgs, prompt, system, as_json,
              sampling, cuda_graph: bool = True) -> None:
    content = media_parts(media) + [{"type": "text", "text": prompt}]
    pipe = Pipeline.load(model, provider=provider, threads=threads, context_length=context_length,
                         cuda_graph=cuda_graph)
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
        drafts = (f"; lookup kept {u['accepted_draft_tokens']} of {u['draft_tokens']} draft tokens"
                  if sampling.get("lookup") else "")
        click.echo(f"[{u['prompt_tokens']} prompt tokens, {u['completion_tokens']} generated; "
                   f"prefill {u['prefill_tokens_per_s']:.1f} tok/s, decode {u['decode_tokens_per_s']:.1f} tok/s"
                   f"{drafts}]", err=True)
    sys.stdout.flush()
