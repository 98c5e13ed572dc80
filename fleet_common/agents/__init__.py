"""Agents: registration, heartbeats, desired state and commands."""
