/*
 * drb-fusermount: what a domain runs where libfuse runs the setuid
 * `fusermount`. A domain may not mount (its seccomp profile refuses mount
 * and there is no setuid helper to lean on), so this stand-in asks the
 * trusted side (drb_uring.disk.fusermount) to do it, over a Unix socket,
 * and passes the /dev/fuse descriptor it gets back to the file system
 * exactly as fusermount does: one byte with the descriptor in SCM_RIGHTS,
 * on the socket named by _FUSE_COMMFD.
 *
 *   drb-fusermount [-o OPTS] [--] MOUNTPOINT        mount (libfuse's call)
 *   drb-fusermount -u [-q] [-z] [--] MOUNTPOINT     unmount
 *
 * With -o auto_unmount it stays, as fusermount does, until the file
 * system's end of _FUSE_COMMFD closes, then has the mount taken away.
 * The socket is $DRB_FUSERMOUNT_SOCKET, else /run/drb/fusermount.sock.
 *
 * Requests are one SOCK_SEQPACKET datagram of NUL-separated fields:
 *   "mount" MOUNTPOINT OPTS  ->  "ok" (with the fd) | "error" ERRNO TEXT
 *   "umount" MOUNTPOINT LAZY ->  "ok" | "error" ERRNO TEXT
 * The trusted side learns who asks from SO_PEERCRED, and which mount
 * namespace from the asking process; nothing in the request is trusted.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define DEFAULT_SOCKET "/run/drb/fusermount.sock"
#define MAX_MSG 8192

static const char *prog = "drb-fusermount";
static int quiet;

static int connect_trusted(void)
{
	const char *path = getenv("DRB_FUSERMOUNT_SOCKET");
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int s;

	if (!path || !*path)
		path = DEFAULT_SOCKET;
	if (strlen(path) >= sizeof(sa.sun_path)) {
		fprintf(stderr, "%s: socket path too long: %s\n", prog, path);
		return -1;
	}
	strcpy(sa.sun_path, path);
	s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (s < 0 || connect(s, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		fprintf(stderr, "%s: cannot reach the trusted side at %s: %s\n", prog, path,
			strerror(errno));
		if (s >= 0)
			close(s);
		return -1;
	}
	return s;
}

/* One request, one answer; *fd gets a descriptor the answer carried. */
static int ask(const char *f0, const char *f1, const char *f2, int *fd)
{
	char msg[MAX_MSG], reply[MAX_MSG + 1];
	size_t n0 = strlen(f0) + 1, n1 = strlen(f1) + 1, n2 = strlen(f2) + 1;
	union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int))]; } cm;
	struct iovec iov = { reply, MAX_MSG };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
			     .msg_control = cm.buf, .msg_controllen = sizeof(cm.buf) };
	struct cmsghdr *c;
	ssize_t r;
	int s, err;

	if (n0 + n1 + n2 > sizeof(msg)) {
		fprintf(stderr, "%s: request too long\n", prog);
		return -1;
	}
	memcpy(msg, f0, n0);
	memcpy(msg + n0, f1, n1);
	memcpy(msg + n0 + n1, f2, n2);
	s = connect_trusted();
	if (s < 0)
		return -1;
	if (send(s, msg, n0 + n1 + n2, 0) < 0) {
		fprintf(stderr, "%s: send: %s\n", prog, strerror(errno));
		close(s);
		return -1;
	}
	do
		r = recvmsg(s, &mh, MSG_CMSG_CLOEXEC);
	while (r < 0 && errno == EINTR);
	close(s);
	if (r <= 0) {
		fprintf(stderr, "%s: no answer from the trusted side\n", prog);
		return -1;
	}
	reply[r] = 0;
	if (fd)
		*fd = -1;
	for (c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS &&
		    c->cmsg_len == CMSG_LEN(sizeof(int))) {
			int got;
			memcpy(&got, CMSG_DATA(c), sizeof(int));
			if (fd && *fd < 0)
				*fd = got;
			else
				close(got);
		}
	}
	if (strcmp(reply, "ok") == 0)
		return 0;
	if (strcmp(reply, "error") == 0 && (size_t)r > 6) {
		const char *num = reply + 6, *text = num + strlen(num) + 1;
		err = atoi(num);
		if (!quiet)
			fprintf(stderr, "%s: %s\n", prog,
				text < reply + r ? text : strerror(err));
		errno = err;
		return -1;
	}
	fprintf(stderr, "%s: malformed answer from the trusted side\n", prog);
	return -1;
}

/* fusermount's send_fd: "To pass file descriptors or credentials you need
 * to send/read at least one byte" (unix(7)). */
static int send_fd(int sock, int fd)
{
	char byte = 0;
	union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int))]; } cm;
	struct iovec iov = { &byte, 1 };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
			     .msg_control = cm.buf, .msg_controllen = sizeof(cm.buf) };
	struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
	ssize_t r;

	memset(cm.buf, 0, sizeof(cm.buf));
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &fd, sizeof(int));
	do
		r = sendmsg(sock, &mh, 0);
	while (r < 0 && errno == EINTR);
	if (r != 1) {
		perror("drb-fusermount: sending file descriptor");
		return -1;
	}
	return 0;
}

static int has_opt(const char *opts, const char *name)
{
	size_t n = strlen(name);
	const char *p = opts;

	while (p && *p) {
		if (strncmp(p, name, n) == 0 && (p[n] == ',' || p[n] == 0))
			return 1;
		p = strchr(p, ',');
		if (p)
			p++;
	}
	return 0;
}

static void usage(void)
{
	fprintf(stderr, "usage: %s [-o opts] [-u [-q] [-z]] [--] mountpoint\n", prog);
	exit(1);
}

int main(int argc, char *argv[])
{
	const char *opts = "";
	char path[PATH_MAX];
	int ch, unmount = 0, lazy = 0, fd, cfd;
	const char *commfd;

	while ((ch = getopt(argc, argv, "ho:uqzV")) != -1) {
		switch (ch) {
		case 'o': opts = optarg; break;
		case 'u': unmount = 1; break;
		case 'q': quiet = 1; break;
		case 'z': lazy = 1; break;
		case 'V': printf("%s: drb fusermount stand-in\n", prog); return 0;
		default: usage();
		}
	}
	if (optind != argc - 1)
		usage();
	/* libfuse hands over an absolute path already; a relative one is
	 * resolved here, since the trusted side resolves from the root. */
	if (argv[optind][0] == '/') {
		if (strlen(argv[optind]) >= sizeof(path))
			usage();
		strcpy(path, argv[optind]);
	} else if (!realpath(argv[optind], path)) {
		fprintf(stderr, "%s: %s: %s\n", prog, argv[optind], strerror(errno));
		return 1;
	}
	if (unmount)
		return ask("umount", path, lazy ? "lazy" : "", NULL) ? 1 : 0;

	commfd = getenv("_FUSE_COMMFD");
	if (!commfd) {
		fprintf(stderr, "%s: old style mounting not supported\n", prog);
		return 1;
	}
	cfd = atoi(commfd);
	if (ask("mount", path, opts, &fd) || fd < 0)
		return 1;
	if (send_fd(cfd, fd))
		return 1;
	close(fd);
	if (!has_opt(opts, "auto_unmount"))
		return 0;

	/* As fusermount: wait for the file system to go (its end of the
	 * socket closes), then have its mount taken away. */
	{
		sigset_t all;
		char buf[16];
		ssize_t n;

		setsid();
		if (chdir("/") < 0)
			return 1;
		sigfillset(&all);
		sigprocmask(SIG_BLOCK, &all, NULL);
		do
			n = recv(cfd, buf, sizeof(buf), 0);
		while (n > 0 || (n < 0 && errno == EINTR));
		quiet = 1;
		return ask("umount", path, "auto", NULL) ? 1 : 0;
	}
}
