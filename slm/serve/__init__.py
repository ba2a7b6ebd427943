"""`slm serve`: an OpenAI-compatible HTTP API (app.py) over a generation engine (engine.py),
speaking the wire format in protocol.py."""
