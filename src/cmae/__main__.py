import sys

from cmae.cli import main

sys.exit(main())
