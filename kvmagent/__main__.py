import sys

from kvmagent.cli import main

sys.exit(main())
