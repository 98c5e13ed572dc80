"""The HTTP pull agent daemon (``fleet agent run``): registers with a join token, heartbeats,
long-polls for work, runs it with the same executors as workers, reports over HTTP."""
