"""``python -m statescan bench ...``"""
import sys

from .cli import main

sys.exit(main())
