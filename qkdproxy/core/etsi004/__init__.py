"""ETSI GS QKD 004 messages."""
