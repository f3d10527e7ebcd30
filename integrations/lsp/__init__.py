"""The LSP bridge (`refusion lsp`): textDocument/inlineCompletion over the native editor protocol.

    backend.py        WebSocket msgpack-RPC client of /v1/editor (also used by bench/editor_latency.py)
    server.py         the language server: inlineCompletion from the cursor's context
    bridge_config.py  the bridge's settings (initializationOptions) and their checks
    documents.py      the open documents in LSP's lines, positions, the text around the cursor
    base_protocol.py  LSP on stdio: framing, JSON-RPC errors, the initialize/shutdown/exit lifecycle
"""
