import sys

from bigmodel_jax.cli import main

sys.exit(main())
