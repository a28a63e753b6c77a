"""Outbound calls: which trunk a call leaves through, at what rate (see trunks.py)."""
