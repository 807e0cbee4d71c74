"""`minicpmo` command line: thin wrappers that parse, call export/ or runtime/, and print.

Data goes to stdout, logs and errors to stderr; a bad input is one `error: ...` line and exit 1.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
from pathlib import Path

import click

from ..export.options import HEAD_PRECISIONS, RESCORED_HEADS, ExportOptions  # no torch: --help's choices
from ..runtime.errors import MiniCPMOError
from ..runtime.sampler import MAX_LOOKUP


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


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging on stderr.")
def cli(verbose: bool) -> None:
    """Export MiniCPM-o 2.6 to int4 ONNX and run it with ONNX Runtime."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--size", type=click.Choice(["tiny", "small", "full"]), default="tiny", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-audio", is_flag=True, help="Leave out the audio encoder weights.")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Copy this tokenizer folder instead of making a small byte-level BPE.")
@_fail_cleanly
def synth(out: Path, size: str, seed: int, no_audio: bool, tokenizer_dir: Path | None) -> None:
    """Write a synthetic checkpoint in the exact upstream format (random weights)."""
    from ..export.synth import write_synthetic_checkpoint

    _interrupt_on_sigterm()
    path = write_synthetic_checkpoint(out, size=size, seed=seed, audio=not no_audio, tokenizer_dir=tokenizer_dir)
    click.echo(str(path))


@cli.command()
@click.argument("checkpoint")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Bundle folder [models/NAME-PRECISION].")
@click.option("--precision", type=click.Choice(["int4", "int8", "fp32"]), default="int4", show_default=True)
@click.option("--lm-head-precision", type=click.Choice(list(HEAD_PRECISIONS)),
              help="int4+int8: an int4 head whose 64 best tokens are rescored with int8 weights (half an "
                   "int8 head's bytes per token); int2+int8: a 2-bit scan, its 128 best rescored (~40% fewer "
                   "head bytes per token, coarser logits outside them). Default: int4+int8 under int4 (int8 with "
                   "--decoder-dtype fp16), else the same as --precision.")
@click.option("--vision-precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True)
@click.option("--block-size", type=click.Choice(["32", "64", "128", "256"]), show_default=True,
              default=str(ExportOptions.block_size),
              help="Weights per int4 scale. 128 reads llama.cpp Q4_0's bytes per token; 64 is ~10% more exact "
                   "and ~11% slower to decode; 256 is the fastest and least exact (README, Speed).")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=4, show_default=True)
@click.option("--decoder-dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp16 for GPUs (CUDA): activations, scales and KV cache in fp16.")
@click.option("--kv-cache", type=click.Choice(["auto", "int8"]), default="auto", show_default=True,
              help="int8: a quarter of the KV cache's memory (CPU, fp32 decoder; decode attention faster, "
                   "prompt attention slower), static scales calibrated at export; auto: the decoder dtype.")
@click.option("--kv-calibration-text", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --kv-cache int8: a text file to calibrate on as well (one prompt per paragraph).")
@click.option("--no-audio", is_flag=True, help="Do not export the audio encoder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle.")
@_fail_cleanly
def export(checkpoint: str, output: Path | None, precision: str, lm_head_precision: str | None,
           vision_precision: str, block_size: str, accuracy_level: int, decoder_dtype: str, kv_cache: str,
           kv_calibration_text: Path | None, no_audio: bool, overwrite: bool) -> None:
    """Export CHECKPOINT (a local snapshot folder or a hub id) into a bundle folder."""
    from ..export.bundle import export_bundle
    from .progress import ProgressPrinter

    opts = ExportOptions(precision=precision, lm_head_precision=lm_head_precision,
                         vision_precision=vision_precision, block_size=int(block_size),
                         accuracy_level=accuracy_level, decoder_dtype=decoder_dtype, kv_cache=kv_cache,
                         kv_calibration_text=str(kv_calibration_text) if kv_calibration_text else None,
                         audio=not no_audio)
    _interrupt_on_sigterm()
    with ProgressPrinter() as progress:
        out = export_bundle(checkpoint, output, opts, overwrite=overwrite, progress=progress)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    q, size = manifest["quantization"], sum(f["bytes"] for f in manifest["files"].values())
    click.echo(f"bundle: {size / 1e9:.2f} GB; weight reconstruction error (relative Frobenius) "
               f"mean {q['relative_error_mean']:.4f}, max {q['relative_error_max']:.4f}", err=True)
    per_tensor = q["per_tensor"]
    if "/lm_head/rescore" in per_tensor:  # the max above is usually the int4 scan's: say what it serves
        from ..export.ops import RESCORE_CANDIDATES

        head = manifest["options"]["lm_head_precision"]
        click.echo(f"lm_head {head}: {head.split('+')[0]} scan {per_tensor['/lm_head']:.4f}, the "
                   f"{RESCORE_CANDIDATES[RESCORED_HEADS[head]]} best rescored at int8 "
                   f"{per_tensor['/lm_head/rescore']:.4f}", err=True)
    click.echo(str(out))


def _runtime_options(fn):
    fn = click.option("--model", "model", required=True, type=click.Path(path_type=Path),
                      help="Bundle folder written by `minicpmo export`.")(fn)
    fn = click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)(fn)
    fn = click.option("--threads", type=click.IntRange(1), help="Intra-op threads [all cores].")(fn)
    fn = click.option("--context", "context_length", type=click.IntRange(16),
                      help="Context length (KV cache size) [4096].")(fn)
    fn = click.option("--no-cuda-graph", is_flag=True,
                      help="On CUDA, run every decode step without CUDA graph replay.")(fn)
    return fn


def _sampling_options(fn):
    fn = click.option("--max-tokens", type=click.IntRange(1), default=256, show_default=True)(fn)
    fn = click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True,
                      help="0 = greedy.")(fn)
    fn = click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)(fn)
    fn = click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="0 = off.")(fn)
    fn = click.option("--repetition-penalty", type=click.FloatRange(0, min_open=True), default=1.0)(fn)
    fn = click.option("--seed", type=int)(fn)
    fn = click.option("--lookup", type=click.IntRange(0, MAX_LOOKUP), default=0, show_default=True,
                      help="Prompt lookup: verify up to N draft tokens per step, copied from where the last "
                           "tokens occurred earlier in the conversation; tokens are drawn as without it "
                           "(0 = off).")(fn)
    return fn


@cli.command()
@_runtime_options
@_sampling_options
@click.option("--image", "images", multiple=True, help="Path, http(s) URL, data URI or base64; repeatable.")
@click.option("--audio", "audios", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Audio file (WAV/FLAC/OGG/MP3); repeatable. Switches on the audio chat template.")
@click.option("--video", type=click.Path(exists=True, dir_okay=False), help="Video file (needs PyAV).")
@click.option("--frames", type=click.Path(exists=True, file_okay=False), help="Folder of video frames.")
@click.option("--fps", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True)
@click.option("--max-frames", type=click.IntRange(1), default=64, show_default=True)
@click.option("--prompt", required=True, help="The question.")
@click.option("--system", help="System prompt (default: the chat template's).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@_fail_cleanly
def infer(model, provider, threads, context_length, no_cuda_graph, max_tokens, temperature, top_p, top_k,
          repetition_penalty, seed, lookup, images, audios, video, frames, fps, max_frames, prompt, system,
          as_json) -> None:
    """Answer one question about images, audio clips or a video."""
    from .infer import MediaArgs, run_infer

    media = MediaArgs(images=images, audios=audios, video=video, frames=frames, fps=fps, max_frames=max_frames)
    run_infer(model=model, provider=provider, threads=threads, context_length=context_length,
              cuda_graph=not no_cuda_graph, media=media, prompt=prompt, system=system, as_json=as_json,
              sampling=dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            repetition_penalty=repetition_penalty, seed=seed, lookup=lookup))


@cli.command()
@_runtime_options
@_sampling_options
@_fail_cleanly
def chat(model, provider, threads, context_length, no_cuda_graph, max_tokens, temperature, top_p, top_k,
         repetition_penalty, seed, lookup) -> None:
    r"""Interactive multi-turn chat: \image, \audio, \video SRC [question]; \system TEXT; \clear; \exit."""
    from .chat import run_chat

    run_chat(model=model, provider=provider, threads=threads, context_length=context_length,
             cuda_graph=not no_cuda_graph,
             sampling=dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                           repetition_penalty=repetition_penalty, seed=seed, lookup=lookup))


@cli.command()
@click.option("--model", "model", required=True, type=click.Path(path_type=Path))
@click.option("--threads", type=click.IntRange(1), help="Intra-op threads [all cores].")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True)
@click.option("--prompt-tokens", type=click.IntRange(16), default=512, show_default=True)
@click.option("--decode-tokens", type=click.IntRange(1), default=128, show_default=True)
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--no-cuda-graph", is_flag=True, help="On CUDA, run every decode step without graph replay.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_fail_cleanly
def bench(model, threads, repeats, prompt_tokens, decode_tokens, provider, no_cuda_graph, as_json) -> None:
    """Measure a bundle: load, vision, time to first token, prefill/decode tok/s, peak RSS, size."""
    import json

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
@_runtime_options
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="MINICPMO_API_KEY", help="Require 'Authorization: Bearer KEY'.")
@click.option("--allowed-local-media", type=click.Path(path_type=Path),
              help="Folder that local image paths may come from (off by default).")
@click.option("--allow-private-urls", is_flag=True, help="Let image URLs reach loopback/private addresses.")
@click.option("--max-queue", type=click.IntRange(1), default=16, show_default=True)
@click.option("--max-image-bytes", type=click.IntRange(1), default=20 * 1024 * 1024, show_default=True)
@click.option("--max-image-pixels", type=click.IntRange(1), default=40_000_000, show_default=True)
@click.option("--request-timeout", type=click.FloatRange(0, min_open=True), default=600.0, show_default=True)
@click.option("--lookup", type=click.IntRange(0, MAX_LOOKUP), default=0, show_default=True,
              help="Prompt lookup draft tokens per step for requests that do not set `lookup` (0 = off).")
@_fail_cleanly
def serve(model, provider, threads, context_length, no_cuda_graph, host, port, api_key, allowed_local_media,
          allow_private_urls, max_queue, max_image_bytes, max_image_pixels, request_timeout, lookup) -> None:
    """OpenAI-compatible HTTP server (POST /v1/chat/completions)."""
    try:
        from ..runtime.server import ServerSettings
        from ..runtime.server import serve as run_server
    except ImportError as e:
        raise click.ClickException(f"the server needs: pip install 'minicpmo-onnx[server]' ({e})") from e
    from ..runtime.manifest import load_manifest
    from ..runtime.pipeline import Pipeline

    if lookup and "logits_start" not in load_manifest(model)["decoder"]["io"]:
        raise click.ClickException(f"--lookup: {model} was exported before prompt lookup existed; re-export it")
    settings = ServerSettings(model_dir=model, host=host, port=port, api_key=api_key,
                              allowed_local_media=allowed_local_media, allow_private_urls=allow_private_urls,
                              max_queue=max_queue, max_image_bytes=max_image_bytes,
                              max_image_pixels=max_image_pixels, request_timeout=request_timeout,
                              default_lookup=lookup)
    run_server(lambda: Pipeline.load(model, provider=provider, threads=threads, context_length=context_length,
                                     cuda_graph=not no_cuda_graph), settings)


def main() -> None:  # pragma: no cover - console script entry
    cli()


if __name__ == "__main__":  # pragma: no cover
    main()
