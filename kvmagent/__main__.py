import sys

from kvmagent.cli.main import main

sys.exit(main())
