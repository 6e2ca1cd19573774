import sys

from drb_uring.cli import main

sys.exit(main())
