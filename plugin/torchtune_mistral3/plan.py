"""``python -m torchtune_mistral3.plan``: the planner's command line (:func:`torchtune_mistral3.planning.main`)."""

import sys

from torchtune_mistral3.planning import main

if __name__ == "__main__":
    sys.exit(main())
