"""ETSI GS QKD 014 documents."""
