"""``python -m bigmodel_apps ...`` == the ``bigmodel`` console script."""

import sys

from bigmodel_apps.cli import main

if __name__ == "__main__":  # importing this module (by name, from anywhere) must not run the CLI
    sys.exit(main())
