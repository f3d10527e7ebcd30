"""Routing between ReFusion and the AR fallback (Mode.AUTO).

ReFusion turns spare compute into tokens: each step runs many query tokens (a plan of the whole pool,
then the chosen drafts) and yields `tpf` tokens per forward. AR runs one token per step and yields one.
When the packed batch is small, a forward costs about the same whatever its size, so ReFusion's extra
tokens are free; when the batch is compute-bound, forward latency grows with every packed token and
AR's cheap steps give more tokens per second.

The router estimates, for the batch that would run with this request added in each mode,

    throughput(mode) = (sum of running requests' tokens per forward + tpf[mode])
                       / (latency(running packed tokens + step_tokens[mode])
                          + host per step + running requests' host seconds + host[mode])
    gain(mode)       = throughput(mode) - throughput of the running batch alone

with latency() from the start-up calibration (`CostCurve`), the host terms (the engine thread's CPU
seconds per step and per request of each decoder beyond that forward) measured live (`HostCost`), and
tpf / step_tokens tracked live per request class (mode, priority) as ratios of exponentially decayed
sums (priors until measured). It picks
the mode whose gain beats the other's by more than `ar_margin` of it; within that margin (a near tie) it
picks AR when the batch would be compute-bound, ReFusion otherwise. Compute-boundness only breaks ties:
the curve already prices every packed token, and an override made the router pick AR against a
ReFusion gain twice AR's (router audit, long outputs). Gains, not totals, are compared: with many
requests running, one more changes the total by little, and a margin on the total would never trigger.
AUTO requests starting in the same step (a burst) are weighed together, all in one mode or all in the
other: each alone would be decided on a batch without the others, and on a cost curve whose marginal
cost falls with size (a CPU's, at small counts) one at a time never leaves AR where all together in
ReFusion are faster.
A running request re-routed at a block boundary (scheduler/mode_switch.py) is weighed the same way with
the running AUTO requests of its decoder, and switches only when the other mode's gain beats its own by
`switch_margin` (hysteresis both ways).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from scheduler.api import Mode, Priority
from scheduler.config import RoutingConfig


class CostCurve:
    """Forward latency (seconds) as a function of packed query tokens: piecewise linear through the
    measured points, extended linearly past the last one.

    Made non-decreasing: a point is lowered to the smallest latency measured at any larger token
    count (timing noise on a shared machine is mostly upward spikes, and a curve that dips would
    make a bigger step look cheaper than a smaller one)."""

    def __init__(self, points: list[tuple[int, float]]):
        if not points:
            raise ValueError("CostCurve needs at least one (tokens, seconds) point")
        merged: dict[int, float] = {}
        for tokens, seconds in points:
            merged[int(tokens)] = min(float(seconds), merged.get(int(tokens), float("inf")))
        ordered = sorted(merged.items())
        floor = float("inf")
        for i in range(len(ordered) - 1, -1, -1):
            floor = min(floor, ordered[i][1])
            ordered[i] = (ordered[i][0], floor)
        self.points = ordered

    def latency(self, tokens: float) -> float:
        pts = self.points
        if len(pts) == 1:
            return pts[0][1]
        if tokens <= pts[0][0]:
            return pts[0][1]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if tokens <= x1:
                return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)
        return pts[-1][1] + self.slope(pts[-1][0]) * (tokens - pts[-1][0])

    def slope(self, tokens: float) -> float:
        """Marginal seconds per extra packed token around `tokens` (never negative)."""
        pts = self.points
        if len(pts) == 1:
            return 0.0
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if tokens <= x1:
                return max(0.0, (y1 - y0) / (x1 - x0))
        (x0, y0), (x1, y1) = pts[-2], pts[-1]
        return max(0.0, (y1 - y0) / (x1 - x0))

    def compute_bound_share(self, tokens: float) -> float:
        """Share of latency(tokens) that grows with the token count: ~0 when overhead-bound, ~1 when
        compute-bound."""
        return min(1.0, self.slope(tokens) * tokens / self.latency(tokens))


@dataclass
class ClassStats:
    """Live estimates for one request class: tokens per forward and packed tokens per decode step.

    Ratio of exponentially decayed sums (tokens / forwards, packed tokens / forwards), not an average
    of per-step ratios: a ReFusion step yields 0 tokens (plan) or a whole slot (verify), so per-step
    ratios swing widely while the ratio of sums is steady. The prior enters as `prior_forwards`
    pseudo-forwards and decays away like any old observation."""

    tpf: float
    step_tokens: float
    samples: int = 0
    tokens_sum: float = 0.0
    forwards_sum: float = 0.0
    packed_sum: float = 0.0

    @classmethod
    def prior(cls, tpf: float, step_tokens: float, prior_forwards: float = 4.0) -> "ClassStats":
        return cls(tpf, step_tokens, 0, tpf * prior_forwards, prior_forwards, step_tokens * prior_forwards)

    def add(self, tokens: float, forwards: float, packed_tokens: float, decay: float) -> None:
        self.tokens_sum = self.tokens_sum * decay + tokens
        self.forwards_sum = self.forwards_sum * decay + forwards
        self.packed_sum = self.packed_sum * decay + packed_tokens
        self.tpf = self.tokens_sum / self.forwards_sum
        self.step_tokens = self.packed_sum / self.forwards_sum
        self.samples += 1


class HostCost:
    """What an engine step costs on the host beyond the calibrated forward: CPU seconds of the engine's
    own thread per request in the step, by decoder (building its segment and KV, absorbing its result,
    streaming its text; a ReFusion decoder's slots, drafts and branches cost more than AR's one token),
    plus a fixed part per step apart from any request (ordering, planning, metrics).

    The start-up calibration times the runner's forward alone. Measured with thread CPU time less
    garbage collections (decoding.cpu_clock: a collection is no decoder's cost) around that work, so
    another process's load on the machine does not enter it:
    a wall-clock fit of step time minus the curve swung from 0.1 to 70 ms per request on a contended
    machine and turned the router's choices at random. Ratios of exponentially decayed sums over routed
    decode steps (`DECAY` per step with that decoder in it, ~50 steps). A decoder not yet seen takes
    the other's cost."""

    DECAY = 0.98

    def __init__(self) -> None:
        self._sum = {Mode.REFUSION: 0.0, Mode.AR: 0.0}
        self._count = {Mode.REFUSION: 0.0, Mode.AR: 0.0}
        self._fixed_sum = 0.0
        self._steps = 0.0

    def add_step(self, per_request: list[tuple[Mode, float]], step_s: float) -> None:
        """One decode step: (decoder, CPU seconds) of each request in it, and the CPU seconds of the
        whole step's host work (>= their sum; the rest is the fixed part)."""
        d = self.DECAY
        present = {mode for mode, _ in per_request if mode in self._sum}
        for mode in present:  # a decoder absent from the step keeps its estimate (no request, no news)
            self._sum[mode] *= d
            self._count[mode] *= d
        for mode, seconds in per_request:
            if mode in present:
                self._sum[mode] += seconds
                self._count[mode] += 1.0
        self._fixed_sum = self._fixed_sum * d + max(0.0, step_s - sum(seconds for _, seconds in per_request))
        self._steps = self._steps * d + 1.0

    def per_request(self) -> dict[Mode, float]:
        """{mode: host seconds per step per request of that decoder}; 0 before any step."""
        seen = {m: self._sum[m] / self._count[m] for m in self._sum if self._count[m] > 1e-6}
        if not seen:
            return {Mode.REFUSION: 0.0, Mode.AR: 0.0}
        return {m: seen.get(m, next(iter(seen.values()))) for m in self._sum}

    @property
    def fixed_s(self) -> float:
        """Host seconds per step apart from its requests; 0 before any step."""
        return self._fixed_sum / self._steps if self._steps else 0.0


@dataclass
class LoadSnapshot:
    """What the running batch costs and yields per step (the request being routed excluded).
    host_s: the running requests' host seconds per step beyond the forward (HostCost.per_request).
    arriving_auto: AUTO requests starting in the same step as the routed one (not in the other
    fields): each option counts them in the mode it weighs."""

    packed_tokens: float = 0.0
    tokens_per_forward: float = 0.0
    running: int = 0
    host_s: float = 0.0
    arriving_auto: int = 0


@dataclass
class RouteDecision:
    """A routing outcome with every input, for logs and metrics."""

    mode: Mode
    reason: str  # forced | refusion_faster | ar_faster | compute_bound | near_tie | keep | repeat | explore
    # | kv_fit (admission's: an AUTO request the KV cache holds only as AR) | healing (admission's: an AUTO
    # request whose healed blanks are still to be written, decoding/healing.py, starts in AR)
    inputs: dict = field(default_factory=dict)


class Router:
    """Chooses REFUSION or AR for AUTO requests (see module docstring)."""

    REPEAT_MEMORY = 4096  # route keys whose last decoder is remembered (a repeated request keeps it)

    def __init__(self, config: RoutingConfig, curve: CostCurve):
        self.config = config
        self.curve = curve
        self._stats: dict[tuple[Mode, Priority], ClassStats] = {}
        self.host = HostCost()
        # request key -> (mode, explored) of its last admission, the most recent REPEAT_MEMORY keys
        self._routed: OrderedDict[int, tuple[Mode, bool]] = OrderedDict()

    def observe_step(self, per_request: list[tuple[Mode, float]], step_s: float) -> None:
        """Fold one decode step's host CPU seconds (per request by decoder, and the whole step's) into
        `HostCost`."""
        if per_request:
            self.host.add_step(per_request, step_s)

    def stats_for(self, mode: Mode, priority: Priority) -> ClassStats:
        key = (mode, Priority(priority))
        if key not in self._stats:
            if mode is Mode.AR:
                self._stats[key] = ClassStats.prior(tpf=1.0, step_tokens=1.0)
            else:
                cfg = self.config
                self._stats[key] = ClassStats.prior(cfg.refusion_tpf_prior, cfg.refusion_step_tokens_prior)
        return self._stats[key]

    def class_stats(self) -> dict[str, dict]:
        """Current estimates per class, e.g. {"refusion/BATCH": {"tpf": 1.8, "step_tokens": 30.2, ...}}."""
        return {f"{m.value}/{p.name}": {"tpf": s.tpf, "step_tokens": s.step_tokens, "samples": s.samples}
                for (m, p), s in self._stats.items()}

    def observe(self, mode: Mode, priority: Priority, tokens: int, forwards: int, packed_tokens: int) -> None:
        """Fold one decode step (tokens it produced, its packed query tokens) into the class estimates."""
        if forwards > 0:
            self.stats_for(mode, priority).add(tokens, forwards, packed_tokens, 1.0 - self.config.ema)

    def decide(self, requested: Mode, priority: Priority, load: LoadSnapshot, current: Mode | None = None,
               request_key: int | None = None) -> RouteDecision:
        """The mode for a request given the load of everything else; `current` is set when re-routing
        a running request (it then switches only if the other mode's gain is larger by switch_margin).
        `request_key` (Request.route_key, a uniform 64-bit digest of what decides the request's
        text) picks the requests that explore, and a repeat of a key whose decoder was recorded by
        `admitted` keeps that decoder (unless the other's gain is larger by switch_margin); without one a
        request never explores. Deciding records nothing: a request that then waits for KV asks again,
        and only the decision it starts with counts for its repeats. Reasons: forced, ar_faster,
        refusion_faster, compute_bound, near_tie, keep, repeat, explore."""
        if requested is not Mode.AUTO:
            return RouteDecision(requested, "forced")
        gain_ref, gain_ar, share, inputs = self._gains(priority, load)
        margin = self.config.ar_margin
        if gain_ar > gain_ref + margin * abs(gain_ref):
            mode, reason = Mode.AR, "ar_faster"
        elif gain_ref > gain_ar + margin * abs(gain_ar):
            mode, reason = Mode.REFUSION, "refusion_faster"
        elif share > self.config.compute_bound_share:
            mode, reason = Mode.AR, "compute_bound"  # a near tie: AR leaves the compute to the others
        else:
            mode, reason = Mode.REFUSION, "near_tie"  # (fewer steps per token: lower latency for the request)
        previous = self._routed.get(request_key) if current is None and request_key is not None else None
        light = load.running + load.arriving_auto < self.config.explore_below_running
        if previous is not None and previous[1] and light:  # an explored request repeated explores alike
            return RouteDecision(previous[0], "repeat", inputs)
        anchor = current or (previous[0] if previous is not None else None)
        if anchor is not None and mode is not anchor:
            # Hysteresis: a running request leaves its mode only for a clear gain (every running request
            # re-decides on the load the others make: without it they switch together and flap), and a
            # request repeated (same route key: same prompt and parameters) keeps the decoder its last
            # run had, so its text stays the same while the estimates drift by a few percent.
            kept, other = (gain_ar, gain_ref) if anchor is Mode.AR else (gain_ref, gain_ar)
            if other <= kept + self.config.switch_margin * abs(kept):
                mode, reason = anchor, ("keep" if current is not None else "repeat")
        if current is None and request_key is not None and light:
            # The further behind the other mode is estimated, the rarer (and so cheaper) its exploration.
            gains = sorted((gain_ref, gain_ar)) if reason in ("ar_faster", "refusion_faster") else (1.0, 1.0)
            stretch = min(gains[1] / gains[0], self.config.explore_max_stretch) if gains[0] > 0 else 1.0
            inputs["explore_period"] = round(self.config.explore_every * max(stretch, 1.0), 1)
            if previous is None and self._explores(request_key, inputs["explore_period"]):
                mode, reason = (Mode.AR if mode is Mode.REFUSION else Mode.REFUSION), "explore"
        return RouteDecision(mode, reason, inputs)

    def _gains(self, priority: Priority, load: LoadSnapshot) -> tuple[float, float, float, dict]:
        """`decide`'s estimates: (gain_refusion, gain_ar) in tokens/s, what the engine's throughput gains
        when this request (and the AUTO ones arriving with it) runs in that mode on `load`; the compute-bound
        share of the step with it in ReFusion; and the inputs, logged with the decision."""
        ref, ar = self.stats_for(Mode.REFUSION, priority), self.stats_for(Mode.AR, priority)
        curve, host = self.curve, self.host.per_request()
        fixed = self.host.fixed_s + load.host_s  # host seconds of a step without the routed request(s)
        base = load.tokens_per_forward / (curve.latency(load.packed_tokens) + fixed) if load.running else 0.0
        n = 1 + load.arriving_auto  # this request and the AUTO ones starting with it, all in the mode weighed
        lat_ref = curve.latency(load.packed_tokens + n * ref.step_tokens) + fixed + n * host[Mode.REFUSION]
        lat_ar = curve.latency(load.packed_tokens + n * ar.step_tokens) + fixed + n * host[Mode.AR]
        gain_ref = (load.tokens_per_forward + n * ref.tpf) / lat_ref - base
        gain_ar = (load.tokens_per_forward + n * ar.tpf) / lat_ar - base
        share = curve.compute_bound_share(load.packed_tokens + n * ref.step_tokens)
        inputs = {
            "running": load.running,
            "arriving_auto": load.arriving_auto,
            "packed_tokens": round(load.packed_tokens, 2),
            "running_tpf_sum": round(load.tokens_per_forward, 3),
            "refusion_tpf": round(ref.tpf, 3),
            "refusion_step_tokens": round(ref.step_tokens, 2),
            "latency_refusion_s": lat_ref,
            "latency_ar_s": lat_ar,
            "host_s": round(load.host_s, 6),
            "host_fixed_s": round(self.host.fixed_s, 6),
            "host_refusion_s": round(host[Mode.REFUSION], 6),
            "host_ar_s": round(host[Mode.AR], 6),
            "throughput_now": round(base, 2),
            "gain_refusion": round(gain_ref, 2),
            "gain_ar": round(gain_ar, 2),
            "compute_bound_share": round(share, 3),
        }
        return gain_ref, gain_ar, share, inputs

    def admitted(self, request_key: int, decision: RouteDecision) -> None:
        """Record the decoder an AUTO request started with (`decide`'s decision for its `request_key`),
        and whether by exploration, for its repeats. Called when the request starts (Scheduler._try_start),
        not when it is decided: the attempts of a request waiting for KV, each on the load of its moment,
        would otherwise overwrite what its own admission or an earlier run recorded."""
        was_explored = self._routed.get(request_key, (None, False))[1]
        explored = decision.reason == "explore" or (decision.reason == "repeat" and was_explored)
        self._routed[request_key] = (decision.mode, explored)
        self._routed.move_to_end(request_key)
        while len(self._routed) > self.REPEAT_MEMORY:
            self._routed.popitem(last=False)

    def _explores(self, request_key: int, period: float) -> bool:
        """Whether a light-load AUTO request takes the other mode: 1 in `period` of requests, chosen by
        their key, so the estimates of a mode the router has stopped choosing still follow the traffic
        (it would never learn otherwise). Only under light load: there a slower request delays nobody
        else's forwards; a request's TPF depends on its text, not on the load. The period is
        explore_every stretched by the estimated throughput gap, which bounds exploration's cost near
        1/explore_every.

        Chosen by key, not by a counter: the same request (same prompt, parameters and seed) sent
        again is explored or not alike, so a seeded or greedy request repeated on an idle server
        gets the same decoder and the same text (a counter made every Nth repeat differ)."""
        if not self.config.explore_every:
            return False
        return (request_key % 2**32) < 2**32 / period
