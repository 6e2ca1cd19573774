"""eBPF C sources loaded with bcc, and the headers they share with Cython.

Installed with the package as ``drb_uring.bpf``; :data:`DIR` is where
they are, in the source tree and in an installed copy alike.
"""
from pathlib import Path

DIR = Path(__file__).resolve().parent
