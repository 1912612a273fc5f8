"""`python -m keras_moe.cli ...` runs the `keras-moe` command line (as `python -m keras_moe`)."""

import sys

from keras_moe.cli import main

sys.exit(main())
