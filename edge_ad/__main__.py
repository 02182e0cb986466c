import sys

from edge_ad.cli.main import main

sys.exit(main())
