"""TLS 1.3 with QKD-KEM as a sans-I/O connection (tlslite is the engine)."""
