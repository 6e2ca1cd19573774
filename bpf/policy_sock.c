/*
 * cgroup-BPF socket policy for the user domain (BPF_PROG_TYPE_CGROUP_SOCK,
 * attached at BPF_CGROUP_INET_SOCK_CREATE). Returns 0 to refuse a socket
 * (EPERM). DENY_MASK is a bit mask of address families (bit = family).
 * The kernel runs this hook for AF_INET and AF_INET6 sockets only.
 */
#ifndef DENY_MASK
#define DENY_MASK ((1ULL << 2) | (1ULL << 10))
#endif

int drb_sock_policy(struct bpf_sock *sk)
{
    __u32 family = sk->family;
    if (family < 64 && ((DENY_MASK >> family) & 1))
        return 0;
    return 1;
}
