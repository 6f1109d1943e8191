"""Split measured energy among engine steps, their requests, and idle.

The engine runs steps back to back or idles; a power source gives cumulative energy readings
(joules). Each `observe()` closes the interval since the previous reading and splits its energy
delta: idle time (no step, or a step with no requests) gets the idle share, the rest goes to the
steps by their time inside the interval, and each step's part to its requests by weighted token
work. Conservation is exact for every interval: idle_j + sum(by_request_j) == energy_j (floating
point aside), so over any window attributed + idle == measured.

Pure code, no locks: the caller serialises calls. Times are seconds on one monotonic clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StepWork:
    """One request's work in one engine step."""

    prefill_tok: int  # prompt tokens computed for this request in the step
    decode_tok: int  # tokens generated for this request in the step

    def __post_init__(self) -> None:
        if self.prefill_tok < 0 or self.decode_tok < 0:
            raise ValueError(f"token counts must be >= 0, got {self}")


@dataclass(frozen=True, slots=True)
class Split:
    """How one reading interval's energy was booked."""

    idle_j: float
    by_request_j: dict[str, float]  # request id -> joules attributed in this interval
    busy_s: float  # time inside the interval covered by steps that carry requests
    interval_s: float
    energy_j: float = 0.0  # the delta split here: idle_j + sum(by_request_j.values())


@dataclass(frozen=True, slots=True)
class EnergyTotals:
    """Cumulative since the first reading; idle_j + attributed_j == observed_j."""

    idle_j: float
    attributed_j: float
    observed_j: float


@dataclass(slots=True)
class _Step:
    t0_s: float
    t1_s: float | None  # None while open
    shares: tuple[tuple[str, float], ...]  # (request id, fraction of the step's work); fractions sum to 1


class EnergyAttributor:
    """Books a replica's measured energy to requests and idle, one reading interval at a time.

    Call `begin_step`/`end_step` around every engine step and `observe` for every energy reading
    (the sampler's, and one when a request finishes, before `finish` so its last step is paid).
    """

    def __init__(
        self,
        *,
        prefill_weight: float = 0.3,
        decode_weight: float = 1.0,
        idle_power_w: float | None = None,
        idle_ewma_alpha: float = 0.2,
    ):
        """prefill_weight/decode_weight: relative energy of one prefill vs one decode token (decode
        is memory-bound, so a prefill token costs less; the profile supplies real values).
        idle_power_w: known idle power; None learns it as an EWMA (idle_ewma_alpha) of the mean
        power of reading intervals that contain no step at all."""
        if prefill_weight < 0 or decode_weight < 0:
            raise ValueError("token weights must be >= 0")
        if idle_power_w is not None and idle_power_w < 0:
            raise ValueError("idle_power_w must be >= 0")
        if not 0 < idle_ewma_alpha <= 1:
            raise ValueError("idle_ewma_alpha must be in (0, 1]")
        self._prefill_weight = prefill_weight
        self._decode_weight = decode_weight
        self._idle_power_w = idle_power_w
        self._idle_power_known = idle_power_w is not None
        self._alpha = idle_ewma_alpha
        self._t_prev_s: float | None = None
        self._e_prev_j = 0.0
        self._closed: list[_Step] = []  # ended steps that may still overlap the next interval
        self._open: _Step | None = None
        self._last_end_s = float("-inf")
        self._energy_j: dict[str, float] = {}
        self._busy_s: dict[str, float] = {}
        self._idle_total_j = 0.0
        self._attributed_total_j = 0.0
        self._observed_total_j = 0.0

    @property
    def idle_power_w(self) -> float | None:
        """Known or learnt idle power; None until learnt."""
        return self._idle_power_w

    @property
    def totals(self) -> EnergyTotals:
        return EnergyTotals(self._idle_total_j, self._attributed_total_j, self._observed_total_j)

    def begin_step(self, t0_s: float, work: Mapping[str, StepWork]) -> None:
        assert self._open is None, "a step is already open"
        assert t0_s >= self._last_end_s, f"step starts at {t0_s} before the previous one ended at {self._last_end_s}"
        weights = {
            rid: self._prefill_weight * w.prefill_tok + self._decode_weight * w.decode_tok for rid, w in work.items()
        }
        total = sum(weights.values())
        if total > 0:
            shares = tuple((rid, w / total) for rid, w in weights.items())
        else:  # no weighted work (e.g. zero weights): the requests share evenly
            shares = tuple((rid, 1.0 / len(weights)) for rid in weights)
        for rid, _ in shares:
            self._energy_j.setdefault(rid, 0.0)
            self._busy_s.setdefault(rid, 0.0)
        self._open = _Step(t0_s, None, shares)

    def end_step(self, t1_s: float) -> None:
        step = self._open
        assert step is not None, "no step is open"
        assert t1_s >= step.t0_s, f"step ends at {t1_s} before it began at {step.t0_s}"
        step.t1_s = t1_s
        self._open = None
        self._last_end_s = t1_s
        self._closed.append(step)

    def observe(self, t_s: float, energy_j: float) -> Split:
        """A cumulative energy reading (J) at t_s; splits the delta since the previous reading.

        The first call only sets the origin. Energy must not decrease (the caller handles counter
        resets). A zero-length interval has no time to split by: its delta is booked as idle.
        """
        if self._t_prev_s is None:
            self._t_prev_s, self._e_prev_j = t_s, energy_j
            self._closed = [s for s in self._closed if s.t1_s > t_s]
            return Split(0.0, {}, 0.0, 0.0, 0.0)
        if t_s < self._t_prev_s:
            raise ValueError(f"reading at {t_s} s is before the previous one at {self._t_prev_s} s")
        if energy_j < self._e_prev_j:
            raise ValueError(f"energy went backwards ({self._e_prev_j} J -> {energy_j} J): counter reset?")
        t_prev_s = self._t_prev_s
        interval_s = t_s - t_prev_s
        delta_j = energy_j - self._e_prev_j
        self._t_prev_s, self._e_prev_j = t_s, energy_j

        overlaps: list[tuple[_Step, float]] = []  # steps with requests, and their time in the interval
        any_step = False  # requestless steps included: their power is not idle power, so don't learn from it
        for step in self._closed if self._open is None else [*self._closed, self._open]:
            end_s = t_s if step.t1_s is None else min(step.t1_s, t_s)
            overlap_s = end_s - max(step.t0_s, t_prev_s)
            if overlap_s > 0:
                any_step = True
                if step.shares:  # a step with no requests is idle time
                    overlaps.append((step, overlap_s))
        self._closed = [s for s in self._closed if s.t1_s > t_s]
        busy_s = sum(o for _, o in overlaps)
        idle_s = max(interval_s - busy_s, 0.0)

        if not overlaps:
            # No request to pay: all of it is idle, whatever the idle power is believed to be.
            idle_j = delta_j
            if not any_step and interval_s > 0 and not self._idle_power_known:
                power_w = delta_j / interval_s
                prev = self._idle_power_w
                self._idle_power_w = power_w if prev is None else prev + self._alpha * (power_w - prev)
        elif self._idle_power_w is not None:
            idle_j = min(delta_j, self._idle_power_w * idle_s)
        else:  # idle power not learnt yet: split by time
            idle_j = delta_j * idle_s / interval_s

        by_request_j: dict[str, float] = {}
        busy_j = delta_j - idle_j
        for step, overlap_s in overlaps:
            step_j = busy_j * overlap_s / busy_s
            for rid, frac in step.shares:
                by_request_j[rid] = by_request_j.get(rid, 0.0) + step_j * frac
                if rid in self._busy_s:  # a finished request is not brought back
                    self._busy_s[rid] += overlap_s * frac
        for rid, j in by_request_j.items():
            if rid in self._energy_j:
                self._energy_j[rid] += j
        attributed_j = sum(by_request_j.values())
        self._idle_total_j += idle_j
        self._attributed_total_j += attributed_j
        self._observed_total_j += delta_j
        return Split(idle_j, by_request_j, busy_s, interval_s, delta_j)

    def request_energy_j(self, request_id: str) -> float:
        """Joules booked to the request so far."""
        return self._energy_j.get(request_id, 0.0)

    def request_busy_s(self, request_id: str) -> float:
        """The request's share of step time so far (s), split like its energy; for GPU-hour cost."""
        return self._busy_s.get(request_id, 0.0)

    def finish(self, request_id: str) -> tuple[float, float]:
        """(energy_j, busy_s) booked to the request, which is then forgotten; (0.0, 0.0) if unknown.
        Call observe() first so the request's last step is paid."""
        return self._energy_j.pop(request_id, 0.0), self._busy_s.pop(request_id, 0.0)
