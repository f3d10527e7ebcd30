"""Prompts shared by the decoder tests (random-weight models: any short code-like text will do)."""

PROMPTS = [
    "def foo(x):\n    return",
    "import os\n",
    "class A:",
    "    if not self",
    "for i in range(10):",
    "x = [1, 2, 3]\nprint(",
]
