import sys

from rmkernels_train.cli import main

sys.exit(main())
