"""What a call is to the gateway, whichever way it came: its identity, how it ended, its events,
where it lives on the node (the directory) and what is kept of it afterwards (records)."""
