r"""`minicpmo chat`: an interactive loop like mistral.rs's. Earlier turns stay in the KV cache, so a
follow-up question only prefills its own tokens.

Commands: \image SRC [question]   \system TEXT   \clear   \exit
"""

from __future__ import annotations

import click

from ..runtime.errors import MiniCPMOError
from ..runtime.pipeline import Pipeline
from ..runtime.preprocess.image import load_image
from ..runtime.types import GenerationParams

HELP = r"commands: \image SRC [question] | \system TEXT | \clear | \exit"


def run_chat(*, model, provider, threads, context_length, sampling) -> None:
    pipe = Pipeline.load(model, provider=provider, threads=threads, context_length=context_length)
    params = GenerationParams(**sampling)
    system: str | None = None
    history: list[dict] = []
    pending_images: list = []
    click.echo(f"{pipe.model_name} ready. {HELP}", err=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line == r"\exit":
            break
        if line == r"\clear":
            history, pending_images = [], []
            click.echo("(conversation cleared)", err=True)
            continue
        if line.startswith(r"\system"):
            system = line[len(r"\system"):].strip() or None
            history, pending_images = [], []
            click.echo("(system prompt set; conversation cleared)", err=True)
            continue
        if line.startswith(r"\image"):
            rest = line[len(r"\image"):].strip().split(maxsplit=1)
            if not rest:
                click.echo(r"usage: \image SRC [question]", err=True)
                continue
            try:
                pending_images.append(load_image(rest[0]))
            except MiniCPMOError as e:
                click.echo(f"error: {e}", err=True)
                continue
            if len(rest) == 1:
                click.echo("(image added; ask your question)", err=True)
                continue
            line = rest[1]
        elif line.startswith("\\"):
            click.echo(HELP, err=True)
            continue
        content = [{"type": "image", "image": im} for im in pending_images] + [{"type": "text", "text": line}]
        turn = {"role": "user", "content": content}
        messages = ([{"role": "system", "content": system}] if system else []) + history + [turn]
        reply = []
        try:
            for chunk in pipe.generate(messages, params):
                if chunk.text:
                    reply.append(chunk.text)
                    click.echo(chunk.text, nl=False)
        except MiniCPMOError as e:
            click.echo(f"error: {e}", err=True)
            continue
        click.echo()
        history += [turn, {"role": "assistant", "content": "".join(reply)}]
        pending_images = []
