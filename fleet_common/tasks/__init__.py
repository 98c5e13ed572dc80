"""Tasks: the model, the state machine, the event log and the services that move them."""
