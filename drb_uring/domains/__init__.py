"""The domains: a user domain and a driver domain, made and unmade.

``config``   a pair's validated configuration;
``control``  bring a pair up, take it down, run a command inside it;
``daemon``   the pair's background process: domains, policies, broker;
``state``    where a pair's state lives (host-only), and the host id ranges;
``runtime``  domains made by runc from generated OCI bundles;
``attach``   containers another runtime made, paired by drb;
``seccomp``  the domains' system call profile and the worker's allowlist;
``init``     PID 1 of a domain drb makes;
``cgroup``, ``policy``  cgroup v2 groups and their cgroup-BPF policies.
"""
