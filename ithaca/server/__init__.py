"""OpenAI-compatible HTTP edge: protocol, routes, errors, media encoding."""
