"""QKD keys: the key-source interfaces, an in-process key source pair, key accounting."""
