"""Next-token choice: penalties -> grammar mask -> temperature -> top-k -> top-p -> min-p -> draw (or
argmax when greedy). The grammar mask applies only with a constraint (structured outputs, runtime/constrain.py).

Small pure filters on float64 logit vectors, composed by `make_sampler` into a seeded `Sampler`. The
order and the top-k/top-p rules follow Hugging Face's logits processors; presence and frequency
penalties follow OpenAI's definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError
from .types import GenerationParams

if TYPE_CHECKING:
    from .constrain import GrammarConstraint

MAX_TOP_LOGPROBS = 20  # OpenAI's bound
MAX_LOOKUP = 16  # draft tokens per step: past ~8 a verify step costs more than the drafts usually win
_TOP_P_CANDIDATES = 2048  # try the nucleus inside the best 2048 tokens before sorting the whole vocabulary


def apply_penalties(logits: np.ndarray, history: np.ndarray, n_prompt: int, *,
                    repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                    frequency_penalty: float = 0.0, penalize_prompt: bool = False) -> np.ndarray:
    """A penalised copy of logits [V].

    repetition_penalty (Hugging Face): every id seen gets its logit divided by the penalty when positive,
    multiplied when negative. Seen = generated ids, or prompt + generated with penalize_prompt. Upstream
    chat() generates from embeddings, so Hugging Face sees no prompt ids there: False matches it.
    presence/frequency (OpenAI): logit -= presence * [count > 0] + frequency * count, generated ids only.
    """
    out = np.array(logits, dtype=np.float64)
    generated = np.asarray(history[n_prompt:], dtype=np.int64)
    if repetition_penalty != 1.0:
        seen = np.unique(history if penalize_prompt else generated).astype(np.int64)
        vals = out[seen]
        out[seen] = np.where(vals < 0, vals * repetition_penalty, vals / repetition_penalty)
    if (presence_penalty or frequency_penalty) and len(generated):
        ids, counts = np.unique(generated, return_counts=True)
        out[ids] -= presence_penalty + frequency_penalty * counts
    return out


def apply_top_k(logits: np.ndarray, top_k: int) -> np.ndarray:
    """Logits below the k-th largest become -inf (ties with the k-th are kept, as Hugging Face does)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -top_k)[-top_k]
    return np.where(logits < kth, -np.inf, logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(x - np.max(x))
    return e / e.sum()


def apply_top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Nucleus filter (Hugging Face rule): drop the least likely tokens whose total probability is at most
    1 - top_p; the most likely token always stays."""
    if top_p >= 1.0:
        return logits
    probs = softmax(logits)
    candidates = np.arange(len(probs))
    outside = 0.0
    if len(probs) > _TOP_P_CANDIDATES:
        best = np.argpartition(probs, -_TOP_P_CANDIDATES)[-_TOP_P_CANDIDATES:]
        rest = 1.0 - probs[best].sum()
        if rest < 1.0 - top_p:  # everything outside `best` is dropped anyway: no need to sort it
            candidates, outside = best, rest
    order = candidates[np.argsort(probs[candidates], kind="stable")]  # ascending
    cumulative = outside + np.cumsum(probs[order])
    drop = cumulative <= 1.0 - top_p
    drop[-1] = False
    keep = np.zeros(len(probs), dtype=bool)
    keep[order[~drop]] = True
    return np.where(keep, logits, -np.inf)


def apply_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop the tokens less likely than min_p times the most likely one (Hugging Face's MinP rule)."""
    if min_p <= 0.0:
        return logits
    finite = logits[np.isfinite(logits)]
    if not len(finite):
        return logits
    # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p)
    return np.where(logits < finite.max() + math.log(min_p), -np.inf, logits)


def draw(logits: np.ndarray, rng: np.random.Generator) -> int:
    """One id drawn from softmax(logits) with the generator's next uniform number."""
    probs = softmax(logits)
    cumulative = np.cumsum(probs)
    index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    index = min(index, len(probs) - 1)
    while probs[index] == 0.0:  # rounding at the very top of the range: step back to a live token
        index -= 1
    return index


def top_logprobs(logits: np.ndarray, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """log softmax(logits)[token], and the n most likely (id, log probability), most likely first.

    Works on the logits' own dtype (float32 from the decoder) and sums in float64: no float64 copy
    of the whole row, which at 151,700 tokens costs more than the arithmetic."""
    x = np.asarray(logits)
    peak = float(x.max())
    log_total = peak + math.log(np.exp(x - peak).sum(dtype=np.float64))
    best = []
    if n > 0:
        # the n largest: the n-th largest value by a partition of the values, then the ids at or above
        # it (an argpartition's index array costs several times more at 151,700 entries)
        ids = np.flatnonzero(x >= np.partition(x, len(x) - n)[len(x) - n]) if n < len(x) else np.arange(len(x))
        ids = ids[np.lexsort((ids, -x[ids]))][:n]  # most likely first, ties by id
        best = [(int(i), float(x[i]) - log_total) for i in ids]
    return float(x[token]) - log_total, best


def validate(params: GenerationParams) -> None:
    """Raise InputError naming the first out-of-range sampling parameter."""
    def bad(name: str, rule: str) -> InputError:
        return InputError(f"{name} must be {rule}, got {getattr(params, name)!r}", param=name)

    t = params.temperature
    if not isinstance(t, Real) or not math.isfinite(t) or t < 0:
        raise bad("temperature", "a finite number >= 0")
    if not isinstance(params.top_p, Real) or not 0 < params.top_p <= 1:
        raise bad("top_p", "in (0, 1]")
    if not isinstance(params.top_k, Integral) or isinstance(params.top_k, bool) or params.top_k < 0:
        raise bad("top_k", "an integer >= 0 (0 = off)")
    if not isinstance(params.min_p, Real) or not 0 <= params.min_p <= 1:
        raise bad("min_p", "in [0, 1] (0 = off)")
    rp = params.repetition_penalty
    if not isinstance(rp, Real) or not math.isfinite(rp) or rp <= 0:
        raise bad("repetition_penalty", "a finite number > 0")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        if not isinstance(value, Real) or not -2 <= value <= 2:
            raise bad(name, "in [-2, 2]")
    if params.seed is not None and (not isinstance(params.seed, Integral) or isinstance(params.seed, bool)):
        raise bad("seed", "an integer or null")
    if not isinstance(params.lookup, Integral) or isinstance(params.lookup, bool) or not 0 <= params.lookup <= MAX_LOOKUP:
        raise bad("lookup", f"an integer in [0, {MAX_LOOKUP}] (0 = off)")
    n = params.top_logprobs
    if not isinstance(n, Integral) or isinstance(n, bool) or not 0 <= n <= MAX_TOP_LOGPROBS:
        raise bad("top_logprobs", f"an integer in [0, {MAX_TOP_LOGPROBS}]")


@dataclass
class Sampler:
    """One request's token chooser. With a grammar constraint (runtime.constrain) the logits are masked
    to what the grammar allows before any filter, and the constraint follows each chosen token. With
    params.logprobs each choice appends (id, log probability, top alternatives) to `logprobs`, computed
    from the logits as given, for the caller to take in order."""

    params: GenerationParams
    rng: np.random.Generator
    penalize_prompt: bool = False
    constraint: GrammarConstraint | None = None
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)

    def __call__(self, logits: np.ndarray, history: np.ndarray, n_prompt: int) -> int:
        """Pick the next id from logits [V] given the ids so far (prompt first, n_prompt of them)."""
        token = self._choose(logits, history, n_prompt)
        if self.params.logprobs:
            self.logprobs.append((token, *top_logprobs(logits, token, self.params.top_logprobs)))
        if self.constraint is not None:
            self.constraint.accept(token)
        return token

    def draft_allowed(self, draft: list[int]) -> int:
        """How many leading tokens of a prompt-lookup draft, following the last chosen token, the
        grammar allows (all of them without a constraint): the rest are not worth verifying."""
        return len(draft) if self.constraint is None else self.constraint.allowed_prefix(draft)

    def _choose(self, logits: np.ndarray, history: np.ndarray, n_prompt: int) -> int:
        p = self.params
        x = apply_penalties(logits, history, n_prompt, repetition_penalty=p.repetition_penalty,
                            presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                            penalize_prompt=self.penalize_prompt)
        if self.constraint is not None:
            x[~self.constraint.allowed()] = -np.inf  # x is apply_penalties' own copy
        if p.temperature == 0:
            return int(np.argmax(x))  # greedy; ties go to the lowest id
        x = apply_top_k(x / p.temperature, p.top_k)
        ids = None
        if 0 < p.top_k < len(x):  # carry on with the survivors only: same draw, a fraction of the work
            ids = np.flatnonzero(np.isfinite(x))
            x = x[ids]
        choice = draw(apply_min_p(apply_top_p(x, p.top_p), p.min_p), self.rng)
        return choice if ids is None else int(ids[choice])


def make_sampler(params: GenerationParams, *, penalize_prompt: bool = False,
                 constraint: GrammarConstraint | None = None) -> Sampler:
    """A sampler for one request; the same seed gives the same tokens. Raises InputError on bad params."""
    validate(params)
    seed = None if params.seed is None else int(params.seed) % 2**64  # any integer, negatives included
    return Sampler(params, np.random.default_rng(seed), penalize_prompt, constraint)
