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


def response_format(schema_file: str | None, json_object: bool) -> dict | None:
    """The response_format of --json-schema FILE / --json-object, checked before the model loads."""
    from ..runtime.constrain import grammar_for
    from ..runtime.errors import InputError

    if schema_file and json_object:
        raise click.UsageError("--json-schema and --json-object exclude each other")
    if json_object:
        return {"type": "json_object"}
    if not schema_file:
        return None
    try:
        schema = json.loads(Path(schema_file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"--json-schema {schema_file}: not a readable JSON file ({e})") from e
    fmt = {"type": "json_schema", "json_schema": {"name": Path(schema_file).stem, "schema": schema}}
    try:
        grammar_for(fmt)
    except InputError as e:
        raise InputError(f"--json-schema {schema_file}: {e}") from e
    return fmt


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


MAX_BATCH = 8  # several prompts decode this many at a time (KV slots of --context each)


def run_infer(*, model, provider, threads, context_length, media: MediaArgs, prompts: list[str], system, as_json,
              sampling, cuda_graph: bool = True, speak: Path | None = None, voice: str | None = None) -> None:
    parts = media_parts(media)
    conversations = [([{"role": "system", "content": system}] if system else [])
                     + [{"role": "user", "content": parts + [{"type": "text", "text": p}]}] for p in prompts]
    if len(prompts) > 1:
        return _run_batch(model, conversations, prompts, provider=provider, threads=threads,
                          context_length=context_length, as_json=as_json, sampling=sampling)
    speech = None
    if speak is not None:
        from .speak import check_output, speech_request

        check_output(speak)
        speech = speech_request(voice, sampling.get("seed"))
    pipe = Pipeline.load(model, provider=provider, threads=threads, context_length=context_length,
                         cuda_graph=cuda_graph, speech=speak is not None)  # speech: load it now, or never
    messages = conversations[0]
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


def _run_batch(model, conversations, prompts, *, provider, threads, context_length, as_json, sampling) -> None:
    """Several questions decoded together; each reply is printed whole when it ends (JSON: one line each)."""
    from ..runtime.batch_decoder import why_not_batched
    from ..runtime.manifest import load_manifest

    manifest = load_manifest(model)
    reason = why_not_batched(manifest, provider)
    parallel = 1 if reason else min(len(prompts), MAX_BATCH)
    if reason:
        click.echo(f"note: answering one question at a time: {reason}", err=True)
    pipe = Pipeline(manifest, provider=provider, threads=threads, context_length=context_length, parallel=parallel)
    texts, ids = [[] for _ in prompts], [[] for _ in prompts]
    for i, chunk in pipe.generate_batch(conversations, GenerationParams(**sampling)):
        texts[i].append(chunk.text)
        ids[i] += chunk.token_ids
        if not chunk.finish_reason:
            continue
        text = "".join(texts[i])
        if as_json:
            click.echo(json.dumps({"index": i, "prompt": prompts[i], "text": text, "finish_reason": chunk.finish_reason,
                                   "token_ids": ids[i], "usage": chunk.usage.as_dict()}))
        else:
            click.echo(f"[{i + 1}] {prompts[i]}\n{text}\n")
            click.echo(f"[{i + 1}] {stats_line(chunk.usage, False)}", err=True)
        sys.stdout.flush()
