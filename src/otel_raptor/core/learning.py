"""Learning which recovery strategy works, per (service, category, strategy).

The rule, in full:

* Every finished recovery that retried records one outcome (recovered or not) for its
  ``(service, category, strategy)``, unless the policy cut it short (a cooldown, a
  ``Retry-After`` too long to wait, an empty budget, this learner's own verdict).
  Outcomes decay exponentially with a half-life of ``half_life_s`` (default 10 minutes),
  so the learner follows a downstream that changes.
* A strategy's score is its smoothed success rate ``(successes + 1) / (attempts + 2)``
  (Laplace's rule: an unknown strategy scores 0.5).
* **Preferring what works** — ``best_strategy`` returns, among the candidates that have at
  least ``min_samples`` (decayed) attempts, the one with the highest score, if it beats the
  default candidate's score; otherwise the default (the first candidate).
* **Not spending retries on what never recovers** — ``should_retry`` is ``False`` when a
  (service, category, strategy) has at least ``min_samples`` decayed attempts and a raw success
  rate under ``futile_below`` (default 5 %). Even then, one call in ``probe_every`` gets through
  as a probe (a counter, not randomness, so the probe rate is exact and testable), and so does
  the first call after ``probe_after_s`` seconds without any attempt; a recovery that then
  succeeds lifts the verdict within a few outcomes.
* The table is bounded (``max_entries``); when full, the entry updated longest ago is dropped.

Pure: time is a parameter, and nothing here is thread-safe by itself (the runtime holds a lock).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from otel_raptor.core.numbers import as_finite
from otel_raptor.core.recovery import Strategy
from otel_raptor.errors import ConfigError

__all__ = ["LearnerOptions", "StrategyLearner", "StrategyStats"]


@dataclass(frozen=True, slots=True, kw_only=True)
class LearnerOptions:
    """Knobs of the strategy learner. Seconds for durations; rates in [0, 1]."""

    half_life_s: float = 600.0
    min_samples: float = 5.0
    futile_below: float = 0.05
    probe_every: int = 10
    probe_after_s: float = 60.0
    max_entries: int = 4096

    def __post_init__(self) -> None:
        # Checked by what they are (a string, None or True used to pass, or fail with a bare
        # TypeError): ``True`` is a bug, not 1.
        half_life = as_finite(self.half_life_s)
        if half_life is None or half_life <= 0:
            raise ConfigError("learning.half_life_s", self.half_life_s, "a number > 0 (seconds)")
        min_samples = as_finite(self.min_samples)
        if min_samples is None or min_samples < 1:
            raise ConfigError("learning.min_samples", self.min_samples, "a number >= 1")
        futile_below = as_finite(self.futile_below)
        if futile_below is None or not 0.0 <= futile_below < 1.0:
            raise ConfigError("learning.futile_below", self.futile_below, "a number in [0, 1)")
        if not _is_int(self.probe_every) or self.probe_every < 1:
            raise ConfigError("learning.probe_every", self.probe_every, "an integer >= 1")
        probe_after = as_finite(self.probe_after_s)
        if probe_after is None or probe_after < 0:
            raise ConfigError(
                "learning.probe_after_s", self.probe_after_s, "a number >= 0 (seconds)"
            )
        if not _is_int(self.max_entries) or self.max_entries < 1:
            raise ConfigError("learning.max_entries", self.max_entries, "an integer >= 1")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(slots=True)
class StrategyStats:
    """Decayed outcome counts for one (service, category, strategy)."""

    attempts: float = 0.0
    successes: float = 0.0
    updated_at: float = 0.0
    refused: int = 0

    def decayed(self, now: float, half_life_s: float) -> tuple[float, float]:
        age = max(0.0, now - self.updated_at)
        factor = 0.5 ** (age / half_life_s)
        return self.attempts * factor, self.successes * factor

    @property
    def score(self) -> float:
        return (self.successes + 1.0) / (self.attempts + 2.0)


_Key = tuple[str, str, Strategy]


@dataclass(slots=True)
class StrategyLearner:
    """Outcome statistics and the two decisions drawn from them (see the module docstring)."""

    options: LearnerOptions = field(default_factory=LearnerOptions)
    _table: dict[_Key, StrategyStats] = field(default_factory=dict)

    def record(
        self, service: str, category: str, strategy: Strategy, *, recovered: bool, now: float
    ) -> None:
        key = (service, category, strategy)
        stats = self._table.get(key)
        if stats is None:
            self._make_room()
            stats = self._table[key] = StrategyStats(updated_at=now)
        attempts, successes = stats.decayed(now, self.options.half_life_s)
        stats.attempts = attempts + 1.0
        stats.successes = successes + (1.0 if recovered else 0.0)
        stats.updated_at = now

    def stats(
        self, service: str, category: str, strategy: Strategy, *, now: float
    ) -> StrategyStats:
        """A decayed copy of the statistics (zeros when nothing was recorded)."""
        stats = self._table.get((service, category, strategy))
        if stats is None:
            return StrategyStats(updated_at=now)
        attempts, successes = stats.decayed(now, self.options.half_life_s)
        return StrategyStats(attempts=attempts, successes=successes, updated_at=now)

    def should_retry(self, service: str, category: str, strategy: Strategy, *, now: float) -> bool:
        """Whether spending retries on this failure is still worth it (probes included)."""
        stats = self._table.get((service, category, strategy))
        if stats is None:
            return True
        attempts, successes = stats.decayed(now, self.options.half_life_s)
        if attempts < self.options.min_samples:
            return True
        if successes / attempts >= self.options.futile_below:
            return True
        if now - stats.updated_at >= self.options.probe_after_s:
            return True
        stats.refused += 1
        if stats.refused >= self.options.probe_every:
            stats.refused = 0
            return True
        return False

    def best_strategy(
        self, service: str, category: str, candidates: tuple[Strategy, ...], *, now: float
    ) -> Strategy:
        """The candidate that has recovered best here; the first one until there is evidence."""
        if not candidates:
            raise ValueError("best_strategy needs at least one candidate")
        default = candidates[0]
        best, best_score = default, self.stats(service, category, default, now=now).score
        for candidate in candidates[1:]:
            stats = self.stats(service, category, candidate, now=now)
            if stats.attempts >= self.options.min_samples and stats.score > best_score:
                best, best_score = candidate, stats.score
        return best

    def __len__(self) -> int:
        return len(self._table)

    def _make_room(self) -> None:
        if len(self._table) < self.options.max_entries:
            return
        oldest = min(self._table, key=lambda k: self._table[k].updated_at)
        del self._table[oldest]
