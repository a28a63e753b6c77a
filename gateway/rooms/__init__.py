"""Conference rooms: the supervisor's registry (registry.py) and a worker's local part of each
room (local.py). See docs/media-design.md, "Conference"."""
