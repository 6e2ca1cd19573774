/*
 * cgroup-BPF device policy for one domain (BPF_PROG_TYPE_CGROUP_DEVICE).
 *
 * Returns 1 to allow an open/mknod of a device node, 0 to refuse it (the
 * caller gets EPERM). Specialised at load time:
 *   ALLOW_BLOCK_MAJOR / ALLOW_BLOCK_MINOR: the one block device this domain
 *     may use (-1 for none: the user domain, or a driver on a regular file).
 * Character devices: only the harmless ones a process needs.
 */
#ifndef ALLOW_BLOCK_MAJOR
#define ALLOW_BLOCK_MAJOR -1
#define ALLOW_BLOCK_MINOR -1
#endif

#define DEVCG_DEV_BLOCK 1
#define DEVCG_DEV_CHAR  2

int drb_dev_policy(struct bpf_cgroup_dev_ctx *ctx)
{
    int type = ctx->access_type & 0xffff;
    int major = ctx->major, minor = ctx->minor;

    if (type == DEVCG_DEV_BLOCK)
        return major == ALLOW_BLOCK_MAJOR && minor == ALLOW_BLOCK_MINOR;
    if (type != DEVCG_DEV_CHAR)
        return 0;
    if (major == 1)           /* null 3, zero 5, full 7, random 8, urandom 9 */
        return minor == 3 || minor == 5 || minor == 7 || minor == 8 || minor == 9;
    if (major == 5)           /* tty 0, console 1, ptmx 2 */
        return minor <= 2;
    if (major == 136)         /* pseudo-terminals */
        return 1;
    return 0;
}
