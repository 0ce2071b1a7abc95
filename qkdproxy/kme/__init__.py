"""The embedded KME simulator: a simulated QKD link and the KMEs at both ends."""
