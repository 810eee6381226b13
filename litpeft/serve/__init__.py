"""``litpeft serve``: an OpenAI-compatible server (LitServe) for a base model and several adapters.

protocol.py  the OpenAI wire format: request schemas and checks, errors, response bodies
models.py    the base loaded once, each adapter on a copy that shares the base's tensors
engine.py    requests -> token ids; a batch generated together, its text streamed per step
api.py       the LitServe API (inference worker) and spec (the three HTTP routes, SSE)
server.py    the ``serve`` command: settle what to serve, build and run the LitServer

Only ``server.py`` is imported by the CLI; LitServe itself is imported when a server starts.
"""
