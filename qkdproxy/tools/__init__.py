"""Tools the daemon never imports: benchmarks, the demo, the development PKI."""
