"""The LSP bridge's settings (BridgeConfig): how it asks the backend for completions, set from
initializationOptions and checked field by field (BridgeConfigError naming the first bad one).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from integrations.editor.protocol import CompleteParams, Limits, RpcError, parse_complete


@dataclass
class BridgeConfig:
    """How the bridge asks for completions; initializationOptions may override any field by name."""

    url: str = "ws://127.0.0.1:8000/v1/editor"
    api_key: str | None = None  # sent as "Authorization: Bearer" when the server requires keys
    prefix_lines: int = 256  # lines above the cursor sent as prefix
    suffix_lines: int = 64  # lines below the cursor sent as suffix
    multiline: str = "auto"  # auto: multi-line only when the cursor line has no text after the cursor
    max_tokens: int | None = None  # None: the backend's default gaps
    max_time_ms: int | None = 2000
    params: dict = field(default_factory=dict)  # extra `complete` params, e.g. {"mode": "ar", "temperature": 0.2}

    def update(self, options: dict | None) -> None:
        """Apply initializationOptions (None values keep the default); raises BridgeConfigError naming the
        first bad option, and then changes nothing."""
        updated = BridgeConfig(**{f.name: getattr(self, f.name) for f in fields(self)})
        for key, value in (options or {}).items():
            if key not in self.__dataclass_fields__:
                raise BridgeConfigError(key, f"is not an option; options are {', '.join(sorted(self.__dataclass_fields__))}")
            if value is not None:
                setattr(updated, key, value)
        updated.check()
        self.__dict__.update(updated.__dict__)

    def check(self) -> None:
        """Raises BridgeConfigError(field, message) for the first field a completion could not use."""
        def integer(value, low):
            return isinstance(value, int) and not isinstance(value, bool) and value >= low

        if not _websocket_url(self.url):
            raise BridgeConfigError("url", f"must be a WebSocket URL (ws://HOST:PORT/v1/editor), got {self.url!r}")
        if self.api_key is not None and not isinstance(self.api_key, str):
            raise BridgeConfigError("api_key", "must be a string")
        for name in ("prefix_lines", "suffix_lines"):
            if not integer(getattr(self, name), 0):
                raise BridgeConfigError(name, f"must be an integer >= 0, got {getattr(self, name)!r}")
        limits = Limits()  # the protocol's defaults (docs/editor-protocol.md): a server answers larger with an error
        for name, most in (("max_tokens", limits.max_tokens), ("max_time_ms", limits.max_time_ms)):
            value = getattr(self, name)
            if value is not None and not (integer(value, 1) and value <= most):
                raise BridgeConfigError(name, f"must be an integer in 1..{most}, got {value!r}")
        if self.multiline not in ("auto", "always", "never"):
            raise BridgeConfigError("multiline", f"must be 'auto', 'always' or 'never', got {self.multiline!r}")
        if not isinstance(self.params, dict):
            raise BridgeConfigError("params", "must be an object of extra `complete` params, e.g. {\"mode\": \"ar\"}")
        for key in self.params:  # a typo ("modee") was ignored, as the protocol ignores unknown keys
            if key in BRIDGE_SETS:
                raise BridgeConfigError(f"params.{key}", "is set by the bridge from the document and the cursor; drop it")
            if key not in COMPLETE_PARAMS:
                raise BridgeConfigError(f"params.{key}", "is not a `complete` param; they are "
                                                         + ", ".join(sorted(COMPLETE_PARAMS)))
        try:  # the protocol's own checks (docs/editor-protocol.md, "complete"): a bad one failed every completion
            parse_complete({**self.params, "uri": "file:///check", "prefix": ""}, limits)
        except RpcError as exc:
            raise BridgeConfigError(f"params.{exc.data['field']}", exc.message.split(": ", 1)[-1]) from None


# `complete` params a client may set through initializationOptions.params, and those the bridge sets itself
BRIDGE_SETS = frozenset({"uri", "prefix", "suffix", "language", "version"})
COMPLETE_PARAMS = frozenset(f.name for f in fields(CompleteParams)) - BRIDGE_SETS


def _websocket_url(url) -> bool:
    """Whether `url` is a ws:// or wss:// URL the websockets client can open (host, valid port)."""
    from websockets.exceptions import InvalidURI
    from websockets.uri import parse_uri

    try:
        return isinstance(url, str) and bool(parse_uri(url).host)
    except (InvalidURI, ValueError):
        return False


class BridgeConfigError(ValueError):
    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name} {message}")
        self.field = field_name
        self.message = message
