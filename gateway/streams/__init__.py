"""`stream` forks: a call's audio to a WebSocket server and back (docs/streams.md)."""
