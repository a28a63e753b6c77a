"""Call supervision (SDK 0.5.0 `calls.supervise`): a supervisor leg listening to, whispering to
or barging into a bridged call. The request models (request.py), the node's record of each
supervision and its state machine (registry.py); the API is gateway/api/supervision.py."""
