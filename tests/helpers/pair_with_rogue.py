"""A pair's daemon whose workers are rogue (tests/helpers/rogue_worker.py),
chosen through the pair's own spawn hook, run inside the real driver domain:

    python pair_with_rogue.py MODE PAIR_CONFIG_JSON READY_FD

Otherwise exactly the daemon `drb up` starts; `drb down` stops it.
"""

import os
import sys

from drb_uring.domains import daemon, state
from drb_uring.domains.config import PairConfig

ROGUE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rogue_worker.py")


class RoguePair(daemon.Pair):
    mode = ""

    def _spawn_worker(self, argv, fds):
        # argv is [python, -m, drb_uring.channel.worker, SPEC]: keep the spec.
        return super()._spawn_worker([sys.executable, ROGUE, self.mode, argv[-1]], fds)


def main() -> int:
    RoguePair.mode = sys.argv[1]
    cfg = PairConfig.from_json(sys.argv[2])
    os.makedirs(state.state_dir(cfg.name), mode=0o700)
    state.record_daemon(cfg.name, os.getpid())
    daemon.Pair = RoguePair
    return daemon.run(cfg, int(sys.argv[3]))


if __name__ == "__main__":
    sys.exit(main())
