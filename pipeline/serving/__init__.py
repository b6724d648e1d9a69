"""The serving endpoint: the app, its guards, the server process, the model slot that follows
the registry, request decoding and micro-batching."""
