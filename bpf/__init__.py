"""eBPF C sources, loaded with bcc (installed with the package as data)."""
