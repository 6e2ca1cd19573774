"""What a person runs: the ``drb`` command and what it shows.

``cli`` the command line; ``demo`` and ``workload`` the main job;
``trace`` histograms and rates; ``bench``, ``ringbench`` and ``ringpeer``
the benchmarks; ``hist`` bpftrace-style histograms; ``_load`` the
channel load generator in C.
"""
