"""`python -m keras_moe ...` runs the `keras-moe` command line."""

import sys

from keras_moe.cli import main

sys.exit(main())
