# What every per-entry loop over a ring end reports back to Python, shared
# by the ring's own soak/benchmark loops and the channel load generator.
from libc.stdint cimport int64_t, uint64_t
from drb_uring.includes.sys cimport EPROTO, EBUSY

cdef enum:
    # A loop's own error code, beside a negative errno.
    ERR_TIMEOUT = -100000


cdef inline object loop_result(int64_t err, uint64_t done, uint64_t errors, uint64_t t0,
                               uint64_t t1, object end):
    import os
    if err == ERR_TIMEOUT:
        error = "timed out waiting for the peer (lost wake-up or stalled peer)"
    elif err == -EPROTO:
        error = "peer published an impossible ring index"
    elif err == -EBUSY:
        error = "the worker answered before the kernel was done with the slot"
    elif err < 0:
        error = os.strerror(<int>-err)
    else:
        error = None
    return {"done": done, "errors": errors, "seconds": (t1 - t0) / 1e9,
            "error": error, **end.stats}
