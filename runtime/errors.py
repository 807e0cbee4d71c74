"""Errors the runtime raises on bad input. Each message names the problem precisely; the CLI and the
server turn them into one-line messages / OpenAI-style 4xx bodies, never tracebacks."""


class MiniCPMOError(Exception):
    """Base class of every error this project raises on purpose."""


class BundleError(MiniCPMOError):
    """A bundle folder is missing a file, has an altered file, or an unreadable manifest."""


class InputError(MiniCPMOError):
    """A request is malformed: bad image, bad audio, bad parameter. HTTP 400."""

    code = "invalid_request"
    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        if param is not None:
            self.param = param
        if code is not None:
            self.code = code


class ImageError(InputError):
    """An image could not be read, decoded or is too large."""

    code = "invalid_image"


class AudioError(InputError):
    """An audio clip could not be read, decoded or is too long."""

    code = "invalid_audio"


class ContextLengthError(InputError):
    """The prompt (plus max_tokens) does not fit in the context window."""

    code = "context_length_exceeded"
