import sys

from asyncgrad.cli import main

sys.exit(main())
