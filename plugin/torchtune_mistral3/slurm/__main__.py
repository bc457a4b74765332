import sys

from ._script import main

sys.exit(main())
