r"""`minicpmo chat`: an interactive loop like mistral.rs's. Earlier turns stay in the KV cache, so a
follow-up question only prefills its own tokens; each reply is fed back as the token ids the model
produced, so the cache keeps all of it.

Ctrl-C stops what is running (an image load, the prefill, the reply) after the graph run in
progress and returns to the prompt; at the prompt it clears the line. Ctrl-D or \exit leaves. Line
editing and history come from Python's readline (history in ~/.minicpmo_history) on a terminal.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..runtime.errors import ContextLengthError, MiniCPMOError
from ..runtime.pipeline import Pipeline
from ..runtime.types import GenerationParams
from .infer import length_note, stats_line

HELP = "\n".join([
    r"  \image SRC [question]     add an image (path, URL, data URI); ask now or with the next line",
    r"  \audio FILE [question]    add an audio clip",
    r"  \video FILE|DIR [question]  add a video (file with PyAV, or a folder of frames)",
    r"  \voice NAME|FILE          the voice of spoken replies (with --speak): a bundle voice or a clip",
    r"  \system [TEXT]            set the system prompt (no text: the default) and start over",
    r"  \clear                    start a new conversation",
    r"  \help                     this list",
    r"  \exit                     leave (or Ctrl-D); Ctrl-C stops a reply",
])
MEDIA_COMMANDS = (r"\image", r"\audio", r"\video")
HISTORY_FILE = Path("~/.minicpmo_history")


def _info(text: str) -> None:
    click.echo(text, err=True)


class ChatSession:
    def __init__(self, pipe: Pipeline, params: GenerationParams, system: str | None = None,
                 max_slices: int | None = None, speak_dir: Path | None = None, speech=None):
        self.pipe, self.params, self.max_slices = pipe, params, max_slices
        self.default_system = self.system = system
        self.history: list[dict] = []
        self.pending: list[dict] = []  # media parts waiting for the next question
        self.speak_dir, self.speech = speak_dir, speech  # speech None: text only
        self.replies = 0  # spoken replies written: reply-1.wav, reply-2.wav, ...

    def handle(self, line: str) -> bool:
        """Process one input line; False means leave."""
        command, _, rest = line.partition(" ")
        if not command.startswith("\\"):
            self.ask(line)
        elif command == r"\exit":
            return False
        elif command == r"\help":
            _info(HELP)
        elif command == r"\clear":
            self.history, self.pending = [], []
            _info("(conversation cleared)")
        elif command == r"\system":
            self.set_system(rest.strip())
        elif command == r"\voice":
            self.set_voice(rest.strip())
        elif command in MEDIA_COMMANDS:
            self.add_media(command, rest.strip())
        else:
            _info(f"unknown command {command}; \\help lists the commands")
        return True

    def set_system(self, text: str) -> None:
        self.system = text or self.default_system
        self.history, self.pending = [], []
        _info("(system prompt set; conversation cleared)" if text else
              "(system prompt restored to the default; conversation cleared)")

    def set_voice(self, voice: str) -> None:
        if self.speech is None:
            _info(r"(\voice needs --speak)")
            return
        if not voice:
            _info(f"usage: \\voice NAME|FILE (voices: {', '.join(self.pipe.voices.names)})")
            return
        from .speak import speech_request

        try:
            speech = speech_request(voice, self.params.seed)
            if speech.reference is None:
                self.pipe.voices.clip(speech.voice)  # an unknown name fails here, not at the next reply
        except MiniCPMOError as e:
            _info(f"error: {e}")
            return
        self.speech = speech
        _info(f"(replies now speak in {'the voice of ' + voice if speech.reference is not None else voice!r})")

    def add_media(self, command: str, args: str) -> None:
        src, _, question = args.partition(" ")
        if not src:
            _info(f"usage: {command} SRC [question]")
            return
        try:
            self.pending.append(self._media_part(command, src))
        except MiniCPMOError as e:
            _info(f"error: {e}")
            return
        except KeyboardInterrupt:
            _info("\n(interrupted)")
            return
        if question.strip():
            self.ask(question.strip())
        else:
            _info("(added; ask your question)")

    def _media_part(self, command: str, src: str) -> dict:
        if command == r"\image":
            from ..runtime.preprocess.image import load_image

            part = {"type": "image", "image": load_image(src)}
            return part if self.max_slices is None else {**part, "max_slices": self.max_slices}
        if command == r"\audio":
            from ..runtime.preprocess.audio import load_audio

            return {"type": "audio", "audio": load_audio(src)}
        from ..runtime.preprocess.video import load_frame_dir, load_video

        frames = load_frame_dir(src) if Path(src).is_dir() else load_video(src)
        return {"type": "video", "frames": frames}

    def ask(self, text: str) -> None:
        turn = {"role": "user", "content": self.pending + [{"type": "text", "text": text}]}
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history + [turn]
        texts, ids, last, audio = [], [], None, []
        replies = self.pipe.generate(messages, self.params, self.speech)
        try:
            for chunk in replies:
                if chunk.audio is not None:
                    audio.append(chunk.audio)
                ids += chunk.token_ids
                if chunk.text:
                    texts.append(chunk.text)
                    click.echo(chunk.text, nl=False)
                if chunk.finish_reason:
                    last = chunk
        except KeyboardInterrupt:
            pass
        except ContextLengthError as e:
            _info(f"error: {e}; \\clear starts a new conversation")
            return
        except MiniCPMOError as e:
            _info(f"error: {e}")
            return
        finally:
            replies.close()
        self._finish_turn(turn, "".join(texts), ids, last)
        if self.speech is not None and last is not None:
            from .speak import save_reply

            self.replies += 1
            _info(save_reply(self.speak_dir / f"reply-{self.replies}.wav", audio, last.usage.speech))

    def _finish_turn(self, turn: dict, text: str, ids: list[int], last) -> None:
        if text:
            click.echo()
        if last is None:  # Ctrl-C
            if not ids:
                _info("(interrupted; the question was dropped)")
                return
            _info("(interrupted; the reply so far stays in the conversation)")
        elif last.finish_reason == "stop" and ids and ids[-1] in self.pipe.stop_ids:
            ids = ids[:-1]  # the template writes the end of the turn itself
        self.history += [turn, {"role": "assistant", "content": text, "token_ids": ids}]
        self.pending = []
        if last is not None:
            if not text:
                _info("(empty reply)")
            note = (length_note(last.usage, self.params.max_tokens, self.pipe.context_length)
                    if last.finish_reason == "length" else None)
            if note:
                _info(f"({note}; \\clear starts a new conversation)" if "context" in note else f"({note})")
            _info(stats_line(last.usage, bool(self.params.lookup)))


def _read_lines(interactive: bool):
    """Input lines; Ctrl-C at the prompt clears the line, Ctrl-D ends."""
    prompt = "> " if interactive else ""
    while True:
        try:
            yield input(prompt).strip()
        except KeyboardInterrupt:
            click.echo()  # a fresh prompt on a new line, as the Python REPL gives
        except EOFError:
            if interactive:
                click.echo()
            return


def _enable_line_editing() -> None:
    """Arrow keys, Ctrl-R and a history file, through Python's readline (absent on some builds)."""
    try:
        import atexit
        import readline
    except ImportError:
        return
    path = HISTORY_FILE.expanduser()
    try:
        readline.read_history_file(path)
    except OSError:  # no history yet, or unreadable
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            readline.write_history_file(path)
        except OSError:
            pass
    atexit.register(save)


def run_chat(*, model, provider, threads, context_length, sampling, system: str | None = None,
             max_slices: int | None = None, cuda_graph: bool = True, speak_dir: Path | None = None,
             voice: str | None = None) -> None:
    interactive = sys.stdin.isatty()
    if interactive:
        _enable_line_editing()
    params = GenerationParams(**sampling)
    speech = None
    if speak_dir is not None:  # a bad reference clip fails before the model loads
        from .speak import speech_request

        speech = speech_request(voice, params.seed)
    pipe = Pipeline.load(model, provider=provider, threads=threads, context_length=context_length,
                         cuda_graph=cuda_graph, speech=speak_dir is not None)
    if speak_dir is not None and pipe.tts is None:
        raise MiniCPMOError("--speak: this model cannot speak (its bundle was exported without the speech model)")
    session = ChatSession(pipe, params, system=system, max_slices=max_slices, speak_dir=speak_dir, speech=speech)
    _info(f"{pipe.model_name} ready ({pipe.context_length} tokens of context). Commands:\n{HELP}")
    for line in _read_lines(interactive):
        if line and not session.handle(line):
            break
