"""The engine loop: admission, batching, mode routing, cancellation, priorities, prefix cache.

Plain Python: no torch import. It turns many requests into a stream of packed forwards on a runner.

Module map:
  api.py           the public contract (GenerationRequest, Delta, Mode, Priority, typed errors)
  engine.py        Engine: async submit/cancel/stop and the step loop (schedule -> execute -> postprocess)
  scheduler.py     Scheduler: bounded queue, KV-block admission, token budget, StepPlan, execute_plan
  request.py       Request (one object per request) and RequestStatus (its one status enum)
  config.py        EngineConfig / RoutingConfig dataclasses, validated at construction
  routing.py       CostCurve, live per-class TPF, Router (ReFusion vs AR for Mode.AUTO)
  calibration.py   start-up timing of forwards -> CostCurve
  mode_switch.py   AUTO requests switching mode at a block boundary (decoder handoff)
  prefix_cache.py  chained-hash cache of full prompt blocks, refcounted, LRU eviction
  detokenizer.py   TextStream: incremental detokenization, stop strings, deadline newline cut
  decoders.py      DecoderFactory protocol and the default factory over decoding/
  validation.py    submit-time checks -> InvalidRequestError(field)
  metrics.py       Prometheus metrics in a per-engine registry
"""
