import sys

from xskbroker.broker.cli import main

sys.exit(main())
