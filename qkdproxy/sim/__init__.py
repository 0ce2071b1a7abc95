"""The KME simulator: the QKD link model and spec-exact ETSI 014/004 servers."""
