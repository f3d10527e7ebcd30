"""Editor completions: the native msgpack-RPC WebSocket protocol, llama.cpp-compatible /infill, and the
infill strategy and post-processing they share (docs/editor-protocol.md).

    protocol.py     frames, error codes, limits, `complete` params validation (pure)
    postprocess.py  single-line, indentation and suffix-repeat rules (pure)
    infill.py       prompt building (shared with /v1/completions `suffix`) (pure)
    gaps.py         candidate gap lengths and the choice among their completions (pure)
    runner.py       one completion against the engine: candidates in parallel, early stop
    session.py      one WebSocket connection: dispatch, supersession, cancel, telemetry
    llama_compat.py llama.cpp /infill request/response shapes
    http.py         the FastAPI router: WebSocket /v1/editor, POST /infill
"""
