r"""`minicpmo chat`: an interactive loop like mistral.rs's. Earlier turns stay in the KV cache, so a
follow-up question only prefills its own tokens.

Commands: \image SRC [question]  \audio FILE [question]  \video FILE|DIR [question]
          \system TEXT  \clear  \exit
"""

from __future__ import annotations

from pathlib import Path

import click

from ..runtime.errors import MiniCPMOError
from ..runtime.pipeline import Pipeline
from ..runtime.types import GenerationParams

HELP = r"commands: \image SRC [q] | \audio FILE [q] | \video FILE|DIR [q] | \system TEXT | \clear | \exit"


def _media_part(command: str, src: str) -> dict:
    if command == r"\image":
        from ..runtime.preprocess.image import load_image

        return {"type": "image", "image": load_image(src)}
    if command == r"\audio":
        from ..runtime.preprocess.audio import load_audio

        return {"type": "audio", "audio": load_audio(src)}
    from ..runtime.preprocess.video import load_frame_dir, load_video

    frames = load_frame_dir(src) if Path(src).is_dir() else load_video(src)
    return {"type": "video", "frames": frames}


class ChatSession:
    def __init__(self, pipe: Pipeline, params: GenerationParams):
        self.pipe, self.params = pipe, params
        self.system: str | None = None
        self.history: list[dict] = []
        self.pending: list[dict] = []  # media parts waiting for the next question

    def handle(self, line: str) -> bool:
        """Process one input line; False means exit."""
        if line == r"\exit":
            return False
        if line == r"\clear":
            self.history, self.pending = [], []
            click.echo("(conversation cleared)", err=True)
        elif line.startswith(r"\system"):
            self.system = line[len(r"\system"):].strip() or None
            self.history, self.pending = [], []
            click.echo("(system prompt set; conversation cleared)", err=True)
        elif line.split(maxsplit=1)[0] in (r"\image", r"\audio", r"\video"):
            command, *rest = line.split(maxsplit=2)
            if not rest:
                click.echo(f"usage: {command} SRC [question]", err=True)
                return True
            try:
                self.pending.append(_media_part(command, rest[0]))
            except MiniCPMOError as e:
                click.echo(f"error: {e}", err=True)
                return True
            if len(rest) == 1:
                click.echo("(added; ask your question)", err=True)
            else:
                self.ask(rest[1])
        elif line.startswith("\\"):
            click.echo(HELP, err=True)
        else:
            self.ask(line)
        return True

    def ask(self, text: str) -> None:
        turn = {"role": "user", "content": self.pending + [{"type": "text", "text": text}]}
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history + [turn]
        reply = []
        try:
            for chunk in self.pipe.generate(messages, self.params):
                if chunk.text:
                    reply.append(chunk.text)
                    click.echo(chunk.text, nl=False)
        except MiniCPMOError as e:
            click.echo(f"error: {e}", err=True)
            return
        click.echo()
        self.history += [turn, {"role": "assistant", "content": "".join(reply)}]
        self.pending = []


def run_chat(*, model, provider, threads, context_length, sampling, cuda_graph: bool = True) -> None:
    pipe = Pipeline.load(model, provider=provider, threads=threads, context_length=context_length,
                         cuda_graph=cuda_graph)
    session = ChatSession(pipe, GenerationParams(**sampling))
    click.echo(f"{pipe.model_name} ready. {HELP}", err=True)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if line and not session.handle(line):
            break
