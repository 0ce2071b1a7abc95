"""Pure logic, in memory: no sockets, no processes, time driven by hand."""
