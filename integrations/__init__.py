"""What users touch: the Ray Serve application, HTTP APIs, the editor protocol, the LSP bridge, the CLI."""
