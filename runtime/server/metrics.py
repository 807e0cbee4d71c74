"""Prometheus text-format metrics (no client library needed): counters, histograms, live gauges.

Thread-safe: the generation worker thread and the event loop both record into them.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Counter:
    def __init__(self, name: str, help_text: str):
        self.name, self.help = name, help_text
        self._values: dict[tuple[tuple[str, str], ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            items = sorted(self._values.items()) or [((), 0.0)]
        lines += [f"{self.name}{_labels(k)} {_number(v)}" for k, v in items]
        return lines


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...] = _LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help_text, buckets
        self._counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self._sum, self._n = 0.0, 0
        self._lock = threading.Lock()

    def observe(self, x: float) -> None:
        with self._lock:
            i = next((i for i, b in enumerate(self.buckets) if x <= b), len(self.buckets))
            self._counts[i] += 1
            self._sum += x
            self._n += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            counts, total, n = list(self._counts), self._sum, self._n
        running = 0
        for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
            running += count
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {running}')
        lines += [f"{self.name}_sum {_number(total)}", f"{self.name}_count {n}"]
        return lines


class Gauge:
    """A value read when metrics are scraped (queue depth, model loaded)."""

    def __init__(self, name: str, help_text: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help_text, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {_number(self.read())}"]


class ServerMetrics:
    """All metrics of one app instance."""

    def __init__(self) -> None:
        self.requests = Counter("minicpmo_requests_total", "HTTP requests by endpoint and status code.")
        self.prompt_tokens = Counter("minicpmo_prompt_tokens_total", "Prompt tokens processed.")
        self.completion_tokens = Counter("minicpmo_completion_tokens_total", "Completion tokens generated.")
        self.cancelled = Counter("minicpmo_generations_cancelled_total",
                                 "Generations stopped early (client gone or request timeout).")
        self.latency = Histogram("minicpmo_request_latency_seconds", "Chat completion latency, arrival to end.")
        self.queue_wait = Histogram("minicpmo_queue_wait_seconds", "Time a request waited for the model.")
        self.first_token = Histogram("minicpmo_time_to_first_token_seconds", "Arrival to the first chunk.")
        self.gauges: list[Gauge] = []

    def add_gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges.append(Gauge(name, help_text, read))

    def render(self) -> str:
        parts = [self.requests, self.prompt_tokens, self.completion_tokens, self.cancelled,
                 self.latency, self.queue_wait, self.first_token, *self.gauges]
        return "\n".join(line for m in parts for line in m.render()) + "\n"
