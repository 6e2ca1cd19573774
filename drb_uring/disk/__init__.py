"""The disk: one device exported as a single regular file through FUSE.

``fuse``       the wire protocol's names, sizes and what each request gets;
``_fuseloop``  the server's loop in C (no GIL): requests from /dev/fuse (or
               FUSE over io_uring) to a backend, answers by ``unique``;
``_backend``   the backend contract (slots, submit, reap) and ``LocalFile``,
               a local file through io_uring;
``server``     the server process (``python -m drb_uring.disk.server``);
``mount``      the trusted side: mounts into another mount namespace,
               aborts and detaches, never looking inside a mount;
``fusermount`` the trusted side of the fusermount stand-in
               (``drb-fusermount``) that libfuse file systems such as
               fuse2fs run to mount.
"""
