"""Enforcement: the monitor's eBPF programs and the I/O task table.

``tasks``     the task table contract (values from bpf/drb_task.h);
``btf``       kernel struct offsets and tracepoints, read from BTF;
``programs``  the loaded programs and their maps (:class:`Enforcer`);
``service``   the host-wide process that loads them once for every pair;
``client``    how a broker talks to that service.
"""
