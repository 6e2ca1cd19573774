"""The double ring: two single-producer/single-consumer rings in shared
memory, in io_uring's own entry formats.

``layout``  the versioned memory layout (pure logic);
``setup``   creating a ring (user side) and attaching to one (driver side);
``_spsc``   the two ends, mapped, with every per-entry operation in C;
``_bench``  loops that soak and measure a ring.
"""

from drb_uring.ring.layout import Geometry, LayoutError
from drb_uring.ring.setup import (
                                  DEFAULT_SPIN_NS,
                                  DriverEnd,
                                  PeerFds,
                                  UserEnd,
                                  attach,
                                  create,
                                  validate_peer_fds,
)

__all__ = ["Geometry", "LayoutError", "DEFAULT_SPIN_NS", "DriverEnd", "PeerFds", "UserEnd",
           "attach", "create", "validate_peer_fds"]
