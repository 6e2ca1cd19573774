"""A channel: one user side's I/O to its extent of the device.

Messages between the parties and the broker are drb_uring.protocol.

``client``    the user side's API (:class:`Channel`, files, asyncio);
``broker``    the trusted process that opens channels: checks the ring,
              builds the grant ring, starts and watches the worker;
``extents``   which part of the device each channel may touch;
``worker``    the driver side's process for one channel (``_worker`` is its
              loop in C; ``_grant`` builds the grant ring it inherits).
"""
