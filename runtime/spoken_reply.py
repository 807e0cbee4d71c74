"""What `Pipeline.generate(..., speech=...)` adds to a reply: the voice's reference clip in front of
the conversation, the speaker position in the prompt, and the audio after the text.

The text is generated with the TTS chat template (its generation prompt ends
`<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>`), exactly as without speech; the final hidden state at
`<|spk|>` is the speaker condition (upstream `_get_last_spk_embeds`), and the reply up to
`<|tts_eos|>` is what is spoken (upstream splits the text there).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .errors import BundleError, InputError
from .generate import StepStats
from .speech import SpeechParams, SpeechRequest, SpeechStats, speak
from .types import GenerationChunk, GenerationParams, Message
from .voices import voice_message


def speech_params(pipe, speech: SpeechRequest, params: GenerationParams) -> SpeechParams:
    """Check the bundle can speak; the speech sampling settings (the bundle's, then the request's)."""
    if pipe.tts is None:
        raise InputError("this model cannot speak: its bundle was exported without the speech (TTS) "
                         "model", param="modalities", code="unsupported_audio_output")
    if not pipe.decoder.has_hidden_states:
        raise BundleError("this bundle's decoder has no hidden_states output, which speech needs; re-export it")
    seed = speech.seed if speech.seed is not None else params.seed
    out = SpeechParams.from_manifest(pipe.speech_info, seed=seed, **speech.overrides())
    out.check()
    return out


def with_voice(pipe, messages: list[Message], speech: SpeechRequest) -> list[Message]:
    """The conversation with the voice's reference clip in upstream's first message, if it has one."""
    clip = speech.reference if speech.reference is not None else pipe.voices.clip(speech.voice)
    if clip is None:
        return messages
    if pipe.audio is None:
        raise InputError("a reference clip needs the audio encoder, which this bundle was exported without",
                         param="audio.voice", code="unsupported_audio")
    return [voice_message(clip, speech.mode, speech.language), *messages]


def speaker_position(tokenizer, ids: np.ndarray) -> int:
    """Where the generation prompt's <|spk|> is (its final hidden state is the speaker condition)."""
    spk = np.flatnonzero(ids == tokenizer.token_to_id("<|spk|>"))
    if not len(spk):
        raise BundleError("the TTS chat template has no <|spk|> token")
    return int(spk[-1])


def stream_speech(pipe, chunks: Iterator[GenerationChunk], stats: StepStats,
                  params: SpeechParams) -> Iterator[GenerationChunk]:
    """Pass the text through, then the audio chunks of what came before <|tts_eos|>, then the final
    chunk (its usage.speech holds the SpeechStats)."""
    tts_eos = pipe.tokenizer.token_to_id("<|tts_eos|>")
    said, ended, final = [], False, None
    for chunk in chunks:
        if chunk.finish_reason is not None:
            final = chunk
            break
        if not ended:
            said.append(chunk.text)
            ended = tts_eos in chunk.token_ids
        yield chunk
    text = "".join(said).strip()
    speech_stats = SpeechStats()
    if text:
        end_id = pipe.speech_info.get("text_eos_token_id")
        for wav in speak(pipe.tts, stats.hidden_state, text, params, speech_stats, text_end_id=end_id):
            yield GenerationChunk(audio=wav)
    if final is not None:
        final.usage.speech = speech_stats
        yield final
