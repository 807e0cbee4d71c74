"""`minicpmo` command line: thin wrappers that parse, call export/ or runtime/, and print.

Data goes to stdout, logs and errors to stderr; a bad input (a bad option value included) is one
`error: ...` line and exit 1.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
from pathlib import Path

import click

from .. import __version__
from ..export.options import HEAD_PRECISIONS, RESCORED_HEADS, ExportOptions  # no torch: --help's choices
from ..runtime.errors import MiniCPMOError
from ..runtime.sampler import MAX_LOOKUP
from .options import (
    MAX_SLICES,
    MODEL,
    RUNTIME,
    SAMPLING,
    SAMPLING_NAMES,
    SYSTEM,
    VOICE,
    ByteSize,
    human_bytes,
)


def _fail_cleanly(fn):
    """Turn the project's own errors (and ValueError from bad arguments) into one line on stderr."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (MiniCPMOError, ValueError, FileNotFoundError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
    return wrapper


def _interrupt_on_sigterm() -> None:
    """Treat SIGTERM (kill, a stopped container) like Ctrl-C: the staged folder a command is writing is
    then deleted on the way out. Python's default for SIGTERM exits at once and would leave it behind."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


class _Commands(click.Group):
    """Click's usage errors (a missing option, a file that does not exist, a bad number) as one
    `error:` line and exit 1, like every other bad input, instead of its usage block and exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:
            hint = (f" (see '{e.ctx.command_path} --help')"
                    if isinstance(e, click.UsageError) and e.ctx is not None else "")
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(1)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)


def _sampling(kwargs: dict) -> dict:
    return {name: kwargs.pop(name) for name in SAMPLING_NAMES}


def _runtime(kwargs: dict) -> dict:
    return {"provider": kwargs.pop("provider"), "threads": kwargs.pop("threads"),
            "context_length": kwargs.pop("context_length"), "cuda_graph": not kwargs.pop("no_cuda_graph")}


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, "-V", "--version", prog_name="minicpmo")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging on stderr.")
def cli(verbose: bool) -> None:
    """Export MiniCPM-o 2.6 to int4 ONNX and run it with ONNX Runtime.

    \b
    minicpmo export openbmb/MiniCPM-o-2_6 -o models/minicpmo-int4
    minicpmo infer --model models/minicpmo-int4 --image photo.jpg --prompt "What is in it?"
    minicpmo chat --model models/minicpmo-int4
    minicpmo serve --model models/minicpmo-int4
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--size", type=click.Choice(["tiny", "small", "full"]), default="tiny", show_default=True,
              help="tiny: seconds to export; small: a 1.5B decoder; full: MiniCPM-o 2.6's exact shapes (8.7B).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--no-audio", is_flag=True, help="Leave out the audio encoder weights.")
@click.option("--no-tts", is_flag=True, help="Leave out the speech weights (tts.*, assets/).")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Copy this tokenizer folder instead of making a small byte-level BPE.")
@_fail_cleanly
def synth(out: Path, size: str, seed: int, no_audio: bool, no_tts: bool, tokenizer_dir: Path | None) -> None:
    """Write a synthetic checkpoint in the exact upstream format (random weights: fluent nonsense).

    \b
    minicpmo synth models/demo-checkpoint --size tiny
    """
    from ..export.synth import write_synthetic_checkpoint

    _interrupt_on_sigterm()
    path = write_synthetic_checkpoint(out, size=size, seed=seed, audio=not no_audio, tokenizer_dir=tokenizer_dir,
                                      tts=not no_tts)
    click.echo(str(path))


def _pairs(specs: tuple[str, ...], flag: str, kind) -> tuple:
    """'PATTERN=VALUE' strings -> ((pattern, value), ...); ExportOptions checks the values."""
    out = []
    for spec in specs:
        pattern, sep, value = spec.rpartition("=")
        if not sep or not pattern:
            raise click.UsageError(f"{flag} takes PATTERN=VALUE, got {spec!r}")
        try:
            out.append((pattern, kind(value)))
        except ValueError:
            raise click.UsageError(f"{flag} {spec!r}: {value!r} is not a valid value") from None
    return tuple(out)


@cli.command()
@click.argument("checkpoint")
@click.option("-o", "--output", type=click.Path(path_type=Path), metavar="DIR",
              help="Bundle folder [models/NAME-PRECISION].")
@click.option("--precision", type=click.Choice(["int4", "int8", "fp32"]), default="int4", show_default=True,
              help="Decoder weights.")
@click.option("--lm-head-precision", type=click.Choice(list(HEAD_PRECISIONS)),
              help="int4+int8: an int4 head whose 64 best tokens are rescored with int8 weights (half an "
                   "int8 head's bytes per token); int2+int8: a 2-bit scan, its 128 best rescored (~40% fewer "
                   "head bytes per token, coarser logits outside them). Default: int4+int8 under int4 (int8 with "
                   "--decoder-dtype fp16), else the same as --precision.")
@click.option("--block-size", type=click.Choice(["32", "64", "128", "256"]), show_default=True,
              default=str(ExportOptions.block_size),
              help="Weights per int4 scale. 128 reads llama.cpp Q4_0's bytes per token; 64 is ~10% more exact "
                   "and ~11% slower to decode; 256 is the fastest and least exact (README, Export options).")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=4, show_default=True,
              help="MatMulNBits compute type: 4 = int8 activations (fastest on CPU), 0 = as the inputs.")
@click.option("--vision-precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="Vision and audio encoder weights (int8: about twice as fast on CPU).")
@click.option("--decoder-dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp16 for GPUs (CUDA): activations, scales and KV cache in fp16.")
@click.option("--kv-cache", type=click.Choice(["auto", "int8"]), default="auto", show_default=True,
              help="int8: a quarter of the KV cache's memory (CPU, fp32 decoder; decode attention faster, "
                   "prompt attention slower), static scales calibrated at export; auto: the decoder dtype.")
@click.option("--kv-calibration-text", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --kv-cache int8: a text file to calibrate on as well (one prompt per paragraph).")
@click.option("--imatrix-text", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A text file whose activations weight the 4-bit range search (llama.cpp's importance "
                   "matrix, measured while exporting; about 2k tokens are used).")
@click.option("--tensor-precision", "tensor_precision", multiple=True, metavar="PATTERN=PRECISION",
              help="A decoder layer's own precision, e.g. 'layers.*/mlp/down_proj=int8' (repeatable; "
                   "the last match wins).")
@click.option("--tensor-accuracy", "tensor_accuracy", multiple=True, metavar="PATTERN=LEVEL",
              help="A decoder layer's own MatMulNBits accuracy level, e.g. 'layers.*/mlp/down_proj=0'.")
@click.option("--no-audio", is_flag=True, help="Do not export the audio encoder.")
@click.option("--tts-precision", type=click.Choice(["int8", "int4", "fp32"]), default="int8", show_default=True,
              help="The speech model's (TTS decoder's) linear layers.")
@click.option("--no-tts", is_flag=True, help="Do not export the speech model (the bundle cannot speak).")
@click.option("--voice", "voices", multiple=True, metavar="NAME=FILE",
              help="Carry a voice for spoken replies: a reference clip of a few seconds (repeatable; "
                   "default=FILE sets the default voice). The checkpoint's example voices come along.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle.")
@_fail_cleanly
def export(checkpoint: str, output: Path | None, precision: str, lm_head_precision: str | None,
           block_size: str, accuracy_level: int, vision_precision: str, decoder_dtype: str, kv_cache: str,
           kv_calibration_text: Path | None, imatrix_text: Path | None, tensor_precision: tuple[str, ...],
           tensor_accuracy: tuple[str, ...], no_audio: bool, tts_precision: str, no_tts: bool,
           voices: tuple[str, ...], overwrite: bool) -> None:
    """Export CHECKPOINT (a local snapshot folder or a hub id) into a bundle folder.

    \b
    minicpmo export openbmb/MiniCPM-o-2_6 -o models/minicpmo-int4
    minicpmo export ./MiniCPM-o-2_6 -o models/minicpmo-gpu --decoder-dtype fp16
    """
    from ..export.bundle import export_bundle
    from .progress import ProgressPrinter

    opts = ExportOptions(precision=precision, lm_head_precision=lm_head_precision,
                         vision_precision=vision_precision, block_size=int(block_size),
                         accuracy_level=accuracy_level, decoder_dtype=decoder_dtype, kv_cache=kv_cache,
                         kv_calibration_text=str(kv_calibration_text) if kv_calibration_text else None,
                         imatrix_text=str(imatrix_text) if imatrix_text else None,
                         tensor_precision=_pairs(tensor_precision, "--tensor-precision", str),
                         tensor_accuracy=_pairs(tensor_accuracy, "--tensor-accuracy", int),
                         audio=not no_audio, tts=not no_tts, tts_precision=tts_precision,
                         voices=_pairs(voices, "--voice", str))
    if opts.voices:  # a bad clip fails now, not after the graphs are written
        from ..runtime.voices import reference_clip

        for name, src in opts.voices:
            reference_clip(src, source=f"--voice {name}")
    _interrupt_on_sigterm()
    with ProgressPrinter() as progress:
        out = export_bundle(checkpoint, output, opts, overwrite=overwrite, progress=progress)
    _print_export_summary(out)


def _print_export_summary(out: Path) -> None:
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    q, size = manifest["quantization"], sum(f["bytes"] for f in manifest["files"].values())
    click.echo(f"bundle: {human_bytes(size)}; weight reconstruction error (relative Frobenius) "
               f"mean {q['relative_error_mean']:.4f}, max {q['relative_error_max']:.4f}", err=True)
    per_tensor = q["per_tensor"]
    if "/lm_head/rescore" in per_tensor:  # the max above is usually the int4 scan's: say what it serves
        from ..export.ops import RESCORE_CANDIDATES

        head = manifest["options"]["lm_head_precision"]
        click.echo(f"lm_head {head}: {head.split('+')[0]} scan {per_tensor['/lm_head']:.4f}, the "
                   f"{RESCORE_CANDIDATES[RESCORED_HEADS[head]]} best rescored at int8 "
                   f"{per_tensor['/lm_head/rescore']:.4f}", err=True)
    click.echo(str(out))


@cli.command()
@MODEL
@click.option("--image", "images", multiple=True, metavar="SRC",
              help="Path, http(s) URL, data URI or base64; repeatable.")
@MAX_SLICES
@click.option("--audio", "audios", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Audio file (WAV/FLAC/OGG/MP3); repeatable. Switches on the audio chat template.")
@click.option("--video", type=click.Path(exists=True, dir_okay=False), help="Video file (needs PyAV).")
@click.option("--frames", type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="Folder of video frames, in natural name order (frame_2 before frame_10).")
@click.option("--fps", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
              help="Video frames kept per second.")
@click.option("--max-frames", type=click.IntRange(1), default=64, show_default=True,
              help="Most video frames (spread evenly over the video).")
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT",
              help="The question; repeatable: several are answered together, each with the same media.")
@click.option("--prompts", "prompts_file", type=click.File("r", encoding="utf-8"), metavar="FILE",
              help="Questions, one per line ('-': stdin), answered together like repeated --prompt.")
@SYSTEM
@click.option("--speak", type=click.Path(path_type=Path), metavar="FILE.wav",
              help="Also speak the reply: write it as a 24 kHz WAV file (bundles exported with speech).")
@VOICE
@SAMPLING
@RUNTIME
@click.option("--json-schema", "json_schema", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="Constrain the reply to JSON that validates against this JSON Schema file.")
@click.option("--json-object", is_flag=True, help="Constrain the reply to a JSON object (any keys).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object instead of streaming text (one line per question when several).")
@_fail_cleanly
def infer(model, images, max_slices, audios, video, frames, fps, max_frames, prompts, prompts_file, system, speak,
          voice, as_json, json_schema, json_object, **kwargs) -> None:
    """Answer a question (or several, decoded together) about images, audio clips or a video.

    \b
    minicpmo infer --model models/minicpmo-int4 --image photo.jpg --prompt "What is in it?"
    minicpmo infer --model models/minicpmo-int4 --audio clip.wav --prompt "What do you hear?" --json
    minicpmo infer --model models/minicpmo-int4 --frames clip/ --prompt "What happens?"
    minicpmo infer --model models/minicpmo-int4 --prompt "Say hello." --speak hello.wav --voice me.wav
    minicpmo infer --model models/minicpmo-int4 --image receipt.jpg --prompt "Extract it." --json-schema receipt.json
    minicpmo infer --model models/minicpmo-int4 --prompts questions.txt --json
    """
    from .infer import MediaArgs, response_format, run_infer

    prompts = list(prompts) + ([line.strip() for line in prompts_file if line.strip()] if prompts_file else [])
    if not prompts:
        raise click.UsageError("give the question with --prompt TEXT (or several with --prompts FILE)")
    if voice and not speak:
        raise click.UsageError("--voice needs --speak FILE.wav")
    if speak and len(prompts) > 1:
        raise click.UsageError("--speak answers one question (one --prompt)")
    media = MediaArgs(images=images, max_slices=max_slices, audios=audios, video=video, frames=frames, fps=fps,
                      max_frames=max_frames)
    sampling = _sampling(kwargs) | {"response_format": response_format(json_schema, json_object)}
    run_infer(model=model, media=media, prompts=prompts, system=system, as_json=as_json,
              sampling=sampling, speak=speak, voice=voice, **_runtime(kwargs))


@cli.command()
@MODEL
@MAX_SLICES
@SYSTEM
@click.option("--speak", is_flag=True, help="Also speak each reply: write it as reply-N.wav (24 kHz) in --speak-dir.")
@click.option("--speak-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, metavar="DIR", help="Where --speak writes its files.")
@VOICE
@SAMPLING
@RUNTIME
@_fail_cleanly
def chat(model, max_slices, system, speak, speak_dir, voice, **kwargs) -> None:
    """Interactive multi-turn chat; earlier turns stay in the KV cache.

    Type a question, or a command: \\image SRC [question], \\audio FILE [question], \\video FILE|DIR
    [question], \\voice NAME|FILE, \\system [TEXT], \\clear, \\help, \\exit. Ctrl-C stops a reply; Ctrl-D
    leaves.

    \b
    minicpmo chat --model models/minicpmo-int4
    minicpmo chat --model models/minicpmo-int4 --system "Answer in one sentence." --temperature 0.7
    minicpmo chat --model models/minicpmo-int4 --speak --speak-dir replies/ --voice me.wav
    """
    from .chat import run_chat

    if voice and not speak:
        raise click.UsageError("--voice needs --speak")
    run_chat(model=model, system=system, max_slices=max_slices, sampling=_sampling(kwargs),
             speak_dir=speak_dir if speak else None, voice=voice, **_runtime(kwargs))


@cli.command()
@MODEL
@click.option("--prompt-tokens", type=click.IntRange(16), default=512, show_default=True,
              help="Length of the measured prompt.")
@click.option("--decode-tokens", type=click.IntRange(1), default=128, show_default=True,
              help="Tokens decoded after it.")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True,
              help="Runs of each measurement (the median is reported).")
@click.option("--threads", type=click.IntRange(1), help="CPU threads per graph [all cores].")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where ONNX Runtime runs the graphs.")
@click.option("--no-cuda-graph", is_flag=True, help="On CUDA, run every decode step without graph replay.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_fail_cleanly
def bench(model, prompt_tokens, decode_tokens, repeats, threads, provider, no_cuda_graph, as_json) -> None:
    """Measure a bundle: load, vision, time to first token, prefill/decode tok/s, peak RSS, size.

    \b
    minicpmo bench --model models/minicpmo-int4 --threads 8 --json
    """
    from ..runtime.bench import run_bench

    result = run_bench(model, threads=threads, repeats=repeats, prompt_tokens=prompt_tokens,
                       decode_tokens=decode_tokens, provider=provider, cuda_graph=not no_cuda_graph,
                       log=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps(result))
    else:
        for key, value in result.items():
            click.echo(f"{key:32} {value}")


@cli.command()
@MODEL
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0: every interface; then set an API key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port.")
@click.option("--served-model-name", "served_names", multiple=True, metavar="NAME",
              help="Model id(s) clients may ask for; repeatable; the first is reported [the bundle's name].")
@click.option("--api-key", envvar="MINICPMO_API_KEY", metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/* and /metrics [$MINICPMO_API_KEY].")
@click.option("--cors-origins", metavar="ORIGINS",
              help="Comma-separated origins browsers may call from ('*': any), e.g. http://localhost:3000.")
@click.option("--max-tokens", "default_max_tokens", type=click.IntRange(1),
              help="Reply length for requests that set no max_tokens [until a stop token or the context's end].")
@click.option("--lookup", type=click.IntRange(0, MAX_LOOKUP), default=0, show_default=True, metavar="N",
              help="Prompt lookup draft tokens per step for requests that do not set `lookup` (0 = off).")
@click.option("--parallel", type=click.IntRange(1), metavar="N",
              help="Requests decoded together, each in its own KV slot of --context tokens [4 where the bundle "
                   "and provider allow it, else 1].")
@click.option("--max-queue", type=click.IntRange(1), default=16, show_default=True,
              help="Requests waiting for a free slot; more get 429 with Retry-After.")
@click.option("--request-timeout", type=click.FloatRange(0, min_open=True), default=600.0, show_default=True,
              metavar="SECONDS", help="Queue wait plus generation; then 504 and the generation stops.")
@click.option("--allowed-local-media", type=click.Path(path_type=Path), metavar="DIR",
              help="Folder that local image paths may come from [none: no local files].")
@click.option("--allow-private-urls", is_flag=True,
              help="Let image URLs reach loopback and private addresses (off: SSRF guard).")
@click.option("--max-image-bytes", type=ByteSize(), default=20 * 1024 * 1024,
              help="Largest encoded image, checked before decoding: 20MiB, 500k, 1048576 [20 MiB].")
@click.option("--max-image-pixels", type=click.IntRange(1), default=40_000_000, metavar="PIXELS",
              help="Largest width x height, checked before decoding [40,000,000].")
@RUNTIME
@_fail_cleanly
def serve(model, **kwargs) -> None:
    """OpenAI-compatible HTTP server: POST /v1/chat/completions, GET /v1/models, /health, /metrics, /docs.

    \b
    minicpmo serve --model models/minicpmo-int4 --port 8000
    MINICPMO_API_KEY=secret minicpmo serve --model models/minicpmo-int4 --host 0.0.0.0
    """
    from .serve import run_serve

    run_serve(model, runtime=_runtime(kwargs), **kwargs)


def main() -> None:  # pragma: no cover - console script entry
    sys.exit(cli(prog_name="minicpmo"))


if __name__ == "__main__":  # pragma: no cover
    main()
