"""Nodes that share conference rooms: liveness, rendezvous homes, node-to-node calls."""
