"""ETSI GS QKD 014: data models (pure) and the async client."""
