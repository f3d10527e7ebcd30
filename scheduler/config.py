"""Engine configuration: one dataclass per concern, validated at construction.

Bad values raise `EngineConfigError(field, message)` naming the field and what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


class EngineConfigError(ValueError):
    """An engine setting is invalid. `field` names it; the message says what to change."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise EngineConfigError(field_name, message)


def _check_scalar_types(config, prefix: str = "") -> None:
    """Each int, float or bool field of a config dataclass holds that type (an int is a float; a bool is
    not an int): a value read from YAML such as max_running: "lots" is named, not compared (it was a
    TypeError from the first range check)."""
    names = {"int": "an integer", "float": "a number", "bool": "true or false"}
    for f in fields(config):
        value, kind = getattr(config, f.name), f.type
        if kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif kind == "bool":
            ok = isinstance(value, bool)
        else:
            continue
        _check(ok, prefix + f.name, f"must be {names[kind]}, got {value!r}")


@dataclass
class RoutingConfig:
    """How Mode.AUTO picks ReFusion or AR (see scheduler.routing).

    calibrate: time a few forwards at start-up to learn latency(packed tokens); tests switch it off and
        pass `cost_points` instead (or rely on the flat default curve).
    calibration_tokens: packed-token counts timed at start-up (clipped to the token budget).
    cost_points: a fixed latency curve [(packed tokens, seconds), ...] used when calibrate is False.
    refusion_tpf_prior / refusion_step_tokens_prior: what a ReFusion request is assumed to produce per
        forward and to cost in packed tokens per step until live measurements exist.
    ar_margin: a mode is chosen for its estimated throughput gain only when that beats the other
        mode's by this fraction; within it the compute-bound rule breaks the tie.
    compute_bound_share: the batch counts as compute-bound when the per-token part of the forward
        latency (slope * tokens) exceeds this share of the whole latency; a near tie then goes to AR.
    switch_margin: a running AUTO request re-routed at a block boundary switches mode only when the
        other mode's estimated gain beats its current mode's by this fraction (hysteresis); a repeated
        request (same route key) leaves the decoder its last run had only so.
    explore_every: about one in this many light-load AUTO admissions takes the mode the router did
        not pick, so a mode's live estimates follow the traffic; 0 = never. Which ones is decided by a
        digest of the request (Request.route_key), so a repeated seeded or greedy request is treated
        alike; the flip side: traffic of a few distinct greedy requests repeated may explore never
        (or always), and the rate holds only over many distinct requests.
    explore_below_running: "light load" = fewer requests than this running, AUTO ones starting with it
        counted (a burst arriving together is not light load).
    explore_max_stretch: when one mode's estimated throughput gain is k times the other's, the explore
        period is explore_every * min(k, explore_max_stretch) (a clearly slower mode is tried less often).
    allow_switch: AUTO requests may switch mode at block boundaries.
    switch_interval_tokens: re-evaluate a running AUTO request at most every this many tokens.
    ema: per-observation decay (1 - ema) of the live per-class sums; ~1/ema decode steps of memory.
        A request's tokens per forward depends on its text, so the memory spans several requests
        (0.002: ~500 decode steps, ~4 ReFusion requests of 128 tokens); at 0.01 the estimate followed
        the last request's text at concurrency 1.
    """

    calibrate: bool = True
    calibration_tokens: tuple[int, ...] = (1, 8, 32, 64, 128, 256, 512)
    calibration_repeats: int = 3
    cost_points: list[tuple[int, float]] | None = None
    refusion_tpf_prior: float = 2.0
    refusion_step_tokens_prior: float = 24.0
    ar_margin: float = 0.05
    compute_bound_share: float = 0.8
    switch_margin: float = 0.2
    explore_every: int = 50
    explore_below_running: int = 4
    explore_max_stretch: float = 10.0
    allow_switch: bool = True
    switch_interval_tokens: int = 32
    ema: float = 0.002

    def __post_init__(self) -> None:
        _check_scalar_types(self, "routing.")
        _check(self.calibration_repeats >= 1, "routing.calibration_repeats", "must be >= 1")
        _check(
            len(self.calibration_tokens) >= 2 and all(n >= 1 for n in self.calibration_tokens),
            "routing.calibration_tokens",
            "give at least two packed-token counts, each >= 1",
        )
        if self.cost_points is not None:
            _check(
                len(self.cost_points) >= 1 and all(n >= 1 and s > 0 for n, s in self.cost_points),
                "routing.cost_points",
                "give [(tokens >= 1, seconds > 0), ...]",
            )
        _check(self.refusion_tpf_prior > 0, "routing.refusion_tpf_prior", "must be > 0")
        _check(self.refusion_step_tokens_prior >= 1, "routing.refusion_step_tokens_prior", "must be >= 1")
        _check(self.ar_margin >= 0, "routing.ar_margin", "must be >= 0")
        _check(self.switch_margin >= 0, "routing.switch_margin", "must be >= 0")
        _check(0 < self.compute_bound_share <= 1, "routing.compute_bound_share", "must be in (0, 1]")
        _check(self.explore_every >= 0, "routing.explore_every", "must be >= 0 (0 = never explore)")
        _check(self.explore_max_stretch >= 1, "routing.explore_max_stretch", "must be >= 1")
        _check(self.switch_interval_tokens >= 1, "routing.switch_interval_tokens", "must be >= 1")
        _check(0 < self.ema <= 1, "routing.ema", "must be in (0, 1]")


@dataclass
class EngineConfig:
    """Engine limits and features.

    max_running: requests decoded concurrently (each holds KV blocks).
    max_queue: waiting requests; beyond it submit() raises OverloadedError at once. An INTERACTIVE
        request counts only the waiting requests ranked with it, and may take max_running places past
        BATCH work filling the queue (it runs ahead of that work).
    token_budget: most query tokens packed into one forward; long prompts are prefilled in chunks.
    kv_reserve_fraction: share of KV blocks never promised at admission (headroom for tentative KV).
    prefix_cache: reuse committed KV of identical prompt prefixes across requests.
    prefix_wait_blocks: a waiting request whose prompt shares at least this many more full KV blocks
        with the prompt a running request is still prefilling than the cache holds waits for that
        prefill, then reads them from the cache instead of computing them again in parallel (`n`
        choices, an editor's gap candidates; SGLang's in-batch prefix caching). 0: never wait.
    deadline_grace_ms: after max_time_ms a request ends at the next newline, or after this grace (one still
        queued with nothing sent ends at max_time_ms: it has no line to finish).
    max_stop_strings: most stop strings per request, the server's own included: the routes bound the
        client's (16 on Messages and the llama.cpp routes, 4 on OpenAI's) and a chat template may add
        its turn end, so this leaves room above the routes' limits.
    preempt_for_interactive: a waiting INTERACTIVE request may send the youngest running BATCH request
        back to the queue (it reruns from scratch later; same tokens, nothing streamed twice).
    max_preemptions: times one BATCH request may be preempted; after that it runs to its end and
        INTERACTIVE requests wait for a slot or KV like everyone else. Each preemption discards the
        request's progress, so without a bound a steady interactive stream could restart a long batch
        request forever (vLLM bounds nothing here but keeps no reservations; this engine does).
    aging_after: times a request may be passed over (steps in a row without budget while running;
        later requests started while it waited) before it is ranked with the first class (aging:
        scheduler.request.Request.rank_class). Under a steady INTERACTIVE stream that fills the slots,
        KV or budget, a BATCH request then still progresses; an aged one is not preempted. 0: strict
        classes (a BATCH request waits for as long as INTERACTIVE requests keep coming, as vLLM's
        priority scheduling). bench/editor_latency.py --no-aging measures the trade.
    fair_share: waiting requests of one priority class start client by client (GenerationRequest.client):
        the client holding the fewest running slots first, then by turns (Scheduler._fair_order), FCFS
        within a client, so a client with many requests in flight does not queue another's behind them
        all (max-min fair
        share of the running slots at admission; the slot-counting variant of the fair queueing of
        Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024). Nobody is preempted for
        it: a client over its share keeps its running requests and waits for its next start. And when the
        queue is full, a request whose client has fewer requests waiting than another client may still
        queue, max_running places past the bound, so one client's flood does not get everyone else
        refused (Scheduler._check_queue_room). False: FCFS within a class, one queue bound for all
        (bench/editor_latency.py --heavy --no-fair-share measures the trade).
    model_dir: directory whose `refusion.json` gives the default decoding parameters; None = the
        runner's own directory (scheduler.decoders.find_model_dir).
    overlap_streaming: detokenize, check stop strings and send a step's text while the next step's
        forward runs on the device, not between the two (scheduler.engine_output.EngineOutput._defer_stream). The
        output is the same; a request ended by a stop string spends one more segment of the forward it
        was planned into, and text reaches the client once the next step is launched (a request's first
        text is never held back). None (default): on when every runner queues its device work and waits
        for it (ModelRunner.asynchronous: CUDA), off on the CPU, where the forward is done before the
        text could go out, so it would only reach the client a forward later (a stop string's end too)
        for no measured gain (docs/benchmarks.md). True / False: always / never (A/B measurements).
    async_scheduling: plan and launch the next step before the current one's results reach the host,
        its tokens fed back from the current step's reads on the device (scheduler.engine_loop.EngineLoop._execute;
        vLLM's async scheduling, SGLang's overlap scheduler), so the host's work between forwards
        (absorbing, streaming, planning, admitting arrivals) runs while the device computes. Only while
        every running request decodes AR (no prompt scoring; an AUTO one about to reach a block boundary
        where it may switch mode, and a grammar request whose next step needs its forced tokens on the
        host, sit a step out) and no INTERACTIVE request that could preempt a running BATCH one waits
        to start; otherwise that step runs after the last one's results are in
        (docs/architecture.md, "Asynchronous scheduling"). The output is the same; a request that ends
        (EOS, a stop string, a cancel) spends one more segment of a forward. None
        (default): on when every runner queues its device work (ModelRunner.asynchronous: CUDA) and
        can launch and collect apart, off on the CPU, where a step's work is done when it is launched.
        True / False: always (ValueError for a runner without launch/collect) / never.
    grammar_token_ms: CPU time a grammar request's matcher may spend on one generated token (matching
        it, its forced tokens and the next bitmask: decoding.grammar.TokenConstraint), in milliseconds;
        past it that request ends with an error naming its grammar's field (the API answers 400) and the
        batch goes on. The engine loop computes every grammar's bitmask before each step, so a grammar
        whose matching cost grows with its text (an ambiguous one) would hold every request back at
        every step. Well-behaved grammars (JSON schemas, regexes, tool calls) take well under 1 ms per
        token (bench/structured_output.py); llguidance documents its own per-mask work limits
        (step_max_items, step_lexer_fuel) as a few to ~15 ms, but they count work units and an
        ambiguous grammar stays under them (decoding/grammar.py). 0: no budget.
    grammar_step_ms: CPU time the slow grammar requests (over SLOW_GRAMMAR_MS per token) may take in one
        step together, in milliseconds, as their last tokens' matching predicts it; past it the others
        sit the step out and take their turn first next time (scheduler.Scheduler._grammar_turns), so
        many requests each under grammar_token_ms do not add up to a slow step for everyone (16 at 45
        ms each made every step 0.7 s). One always runs, and nobody waits when every running request is
        slow (no one to protect). Fast grammars (well under a millisecond per token) never wait. 0: no
        step budget.
    """

    max_running: int = 64
    max_queue: int = 256
    token_budget: int = 512
    kv_reserve_fraction: float = 0.05
    prefix_cache: bool = True
    prefix_wait_blocks: int = 2
    deadline_grace_ms: int = 500
    max_stop_strings: int = 24
    preempt_for_interactive: bool = True
    max_preemptions: int = 2
    aging_after: int = 8
    fair_share: bool = True
    model_dir: str | None = None
    overlap_streaming: bool | None = None
    async_scheduling: bool | None = None
    grammar_token_ms: float = 50.0
    grammar_step_ms: float = 20.0
    routing: RoutingConfig = field(default_factory=RoutingConfig)

    def __post_init__(self) -> None:
        _check_scalar_types(self)
        _check(self.max_running >= 1, "max_running", "must be >= 1")
        _check(self.max_queue >= 0, "max_queue", "must be >= 0 (0 = reject whenever all running slots are busy)")
        _check(self.token_budget >= 1, "token_budget", "must be >= 1 query token per forward")
        _check(0 <= self.kv_reserve_fraction < 1, "kv_reserve_fraction", "must be in [0, 1)")
        _check(self.deadline_grace_ms >= 0, "deadline_grace_ms", "must be >= 0")
        _check(isinstance(self.prefix_wait_blocks, int) and self.prefix_wait_blocks >= 0, "prefix_wait_blocks",
               "must be an integer >= 0 (0: never wait for another request's prefill)")
        _check(self.max_stop_strings >= 0, "max_stop_strings", "must be >= 0")
        _check(isinstance(self.max_preemptions, int) and self.max_preemptions >= 0, "max_preemptions",
               "must be an integer >= 0 (0: no request is preempted)")
        _check(isinstance(self.aging_after, int) and self.aging_after >= 0, "aging_after",
               "must be an integer >= 0 (0: strict priority classes, no aging)")
        _check(self.overlap_streaming is None or isinstance(self.overlap_streaming, bool), "overlap_streaming",
               "must be true, false or null (null: on for CUDA runners, off on the CPU)")
        _check(self.async_scheduling is None or isinstance(self.async_scheduling, bool), "async_scheduling",
               "must be true, false or null (null: on for CUDA runners, off on the CPU)")
        _check(self.grammar_token_ms >= 0, "grammar_token_ms", "must be >= 0 milliseconds (0: no budget)")
        _check(self.grammar_step_ms >= 0, "grammar_step_ms", "must be >= 0 milliseconds (0: no step budget)")
        _check(isinstance(self.routing, RoutingConfig), "routing", "must be a scheduler.config.RoutingConfig")
