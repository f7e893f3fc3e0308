import sys

from celerylab.cli import main

sys.exit(main())
