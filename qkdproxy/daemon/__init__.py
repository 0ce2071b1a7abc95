"""The daemon: the one place that wires tunnels, key supplies and observability."""
