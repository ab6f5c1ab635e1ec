"""The ``personalize`` command line (``personalize ...``, ``python -m personalize.cli ...``): see :mod:`.app`."""
from .app import app, main
from .console import err_console, out_console

__all__ = ["app", "main", "out_console", "err_console"]
