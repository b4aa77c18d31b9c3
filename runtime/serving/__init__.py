"""A replica's OpenAI-compatible HTTP server, its engine thread, metrics and the opt-in request log."""
