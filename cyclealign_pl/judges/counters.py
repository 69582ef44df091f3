"""Thread-safe float counters (the judge's threads share them) that pickle without their lock, for resume."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any


class Counters:
    """Cumulative float counters shared by the judge's threads; they pickle (for resume) without the lock."""

    def __init__(self, names: Iterable[str]) -> None:
        self._values = dict.fromkeys(names, 0.0)
        self._lock = threading.Lock()

    def bump(self, name: str, value: float = 1.0) -> None:
        with self._lock:
            self._values[name] += value

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._values[name] = float(value)

    def maximum(self, name: str, value: float) -> None:
        with self._lock:
            self._values[name] = max(self._values[name], float(value))

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)

    def load(self, values: Mapping[str, float]) -> None:
        with self._lock:
            for name, value in values.items():
                if name in self._values:
                    self._values[name] = float(value)

    def __getstate__(self) -> dict[str, Any]:
        return {"_values": self.snapshot()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._values = dict(state["_values"])
        self._lock = threading.Lock()


__all__ = ["Counters"]
