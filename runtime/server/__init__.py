"""tsrun's API process: the OpenAI-compatible HTTP server in front of the engine process.

Request path (DESIGN.md §Serve): body_limit.py bounds the body -> schemas.py and
validation.py check every field (errors.py: OpenAI's error JSON) -> openai_api.py tokenizes
-> serving.py fans a request out into engine requests -> engine_client.py carries them over
the IPC queues (runtime/protocol.py) and routes the engine's outputs back ->
output.py/detokenizer.py turn token ids into text and match stop strings -> responses.py
writes OpenAI JSON / SSE. shutdown.py drains the server on SIGTERM.
"""
from __future__ import annotations

from tscompile.runtime.server.engine_client import EngineClient
from tscompile.runtime.server.openai_api import create_app

__all__ = ["EngineClient", "create_app"]
