"""Executor tests: local subprocesses and a real sshd."""
