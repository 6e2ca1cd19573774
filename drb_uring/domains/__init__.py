"""The domains: a user domain and a driver domain, made and unmade.

``config``   a pair's validated configuration;
``control``  bring a pair up, take it down, run a command inside it;
``daemon``   the pair's background process: domains, policies, broker;
``init``     processes that run inside a domain;
``cgroup``, ``policy``, ``nsutil``  cgroup v2 groups, their cgroup-BPF
policies, and entering a domain's namespaces.
"""
