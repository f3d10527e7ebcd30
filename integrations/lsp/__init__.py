"""The LSP bridge (`refusion lsp`): textDocument/inlineCompletion over the native editor protocol.

    backend.py        WebSocket msgpack-RPC client of /v1/editor (also used by bench/editor_latency.py)
    server.py         the language server: documents, the cursor's context, inlineCompletion
    base_protocol.py  LSP on stdio: framing, JSON-RPC errors, the initialize/shutdown/exit lifecycle
"""
