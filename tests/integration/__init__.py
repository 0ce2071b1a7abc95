"""In-process components over real sockets: TLS peers, KME servers, tunnels."""
