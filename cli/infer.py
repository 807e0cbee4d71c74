"""`minicpmo infer`: one user turn holding the images, then the video frames, then the audio clips,
then the text (upstream chat() joins a content list [image, audio, text] in that order)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from ..runtime.pipeline import Pipeline
from ..runtime.preprocess.image import load_image
from ..runtime.types import GenerationParams, Usage


@dataclass
class MediaArgs:
    images: tuple[str, ...] = ()
    max_slices: int | None = None  # per image; None: the bundle's
    audios: tuple[str, ...] = ()
    video: str | None = None
    frames: str | None = None
    fps: float = 1.0
    max_frames: int = 64


def media_parts(media: MediaArgs) -> list[dict]:
    """Decode every input up front, so a bad file fails before the model loads."""
    parts = [{"type": "image", "image": load_image(src)} for src in media.images]
    if media.max_slices is not None:
        for part in parts:
            part["max_slices"] = media.max_slices
    if media.video or media.frames:
        from ..runtime.preprocess.video import load_frame_dir, load_video

        frames = (load_video(media.video, fps=media.fps, max_frames=media.max_frames) if media.video
                  else load_frame_dir(media.frames, max_frames=media.max_frames))
        parts.append({"type": "video", "frames": frames})
    if media.audios:
        from ..runtime.preprocess.audio import load_audio

        parts += [{"type": "audio", "audio": load_audio(src)} for src in media.audios]
    return parts


def length_note(usage: Usage, max_tokens: int, context_length: int) -> str | None:
    """Why a reply that ran to its length limit stopped: --max-tokens, or the end of the context."""
    room = context_length - usage.prompt_tokens
    if usage.completion_tokens >= room:
        return (f"the reply filled the context ({context_length} tokens: {usage.prompt_tokens} prompt + "
                f"{usage.completion_tokens} reply); a larger --context leaves more room")
    if usage.completion_tokens >= max_tokens:
        return f"the reply stopped at --max-tokens {max_tokens}"
    return None


def stats_line(usage: Usage, lookup: bool) -> str:
    u = usage.as_dict()
    drafts = (f"; lookup kept {u['accepted_draft_tokens']} of {u['draft_tokens']} draft tokens" if lookup else "")
    cached = f" ({u['cached_prompt_tokens']} cached)" if u["cached_prompt_tokens"] else ""
    return (f"[{u['prompt_tokens']} prompt tokens{cached}, {u['completion_tokens']} generated; "
            f"prefill {u['prefill_tokens_per_s']:.1f} tok/s, decode {u['decode_tokens_per_s']:.1f} tok/s{drafts}]")


def run_infer(*, model, provider, threads, context_length, media: MediaArgs, prompt, system, as_json,
              sampling, cuda_graph: bool = True, speak: Path | None = None, voice: str | None = None) -> None:
    content = media_parts(media) + [{"type": "text", "text": prompt}]
    speech = None
    if speak is not None:
        from .speak import check_output, speech_request

        check_output(speak)
        speech = speech_request(voice, sampling.get("seed"))
    pipe = Pipeline.load(model, provider=provider, threads=threads, context_length=context_length,
                         cuda_graph=cuda_graph, speech=speak is not None)  # speech: load it now, or never
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    params = GenerationParams(**sampling)
    text, ids, last, audio = [], [], None, []
    for chunk in pipe.generate(messages, params, speech):
        if chunk.audio is not None:
            audio.append(chunk.audio)
        ids += chunk.token_ids
        if chunk.text:
            text.append(chunk.text)
            if not as_json:
                click.echo(chunk.text, nl=False)
        if chunk.finish_reason:
            last = chunk
    room = pipe.context_length - last.usage.prompt_tokens
    if params.max_tokens > room:
        click.echo(f"note: --max-tokens {params.max_tokens} is more than the context leaves for the reply "
                   f"({room} of {pipe.context_length} tokens)", err=True)
    said = None
    if speak is not None:
        from .speak import save_reply

        said = save_reply(speak, audio, last.usage.speech)
    if as_json:
        out = {"text": "".join(text), "finish_reason": last.finish_reason, "token_ids": ids,
               "prompt_token_ids": pipe.last_prompt_ids, "usage": last.usage.as_dict()}
        if speak is not None:
            s = last.usage.speech
            out["audio"] = {"path": str(speak), "seconds": round(s.audio_seconds, 3), "codes": s.codes,
                            "compute_seconds": round(s.seconds, 3), "truncated_text": s.truncated_text}
        click.echo(json.dumps(out))
    else:
        click.echo()
        note = length_note(last.usage, params.max_tokens, pipe.context_length) if last.finish_reason == "length" \
            else None
        if note:
            click.echo(f"({note})", err=True)
        click.echo(stats_line(last.usage, bool(sampling.get("lookup"))), err=True)
    if said:
        click.echo(said, err=True)
    sys.stdout.flush()
