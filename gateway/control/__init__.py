"""Live-control operations: one model per op, one file each (like the verbs in dsl/verbs/).

An op travels supervisor -> worker inside a `Request` (gateway/workers/protocol.py) and is
answered with a `Reply`. The API validates what it can before sending (a redirect's document),
so a worker only refuses an op for what it alone knows (the call is gone, it is not answered).
"""
