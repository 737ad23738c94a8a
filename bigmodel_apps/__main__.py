"""``python -m bigmodel_apps ...`` == the ``bigmodel`` console script."""

import sys

from bigmodel_apps.cli import main

sys.exit(main())
