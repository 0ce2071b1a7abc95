"""Real daemon and KME processes, driven from outside as an operator would."""
