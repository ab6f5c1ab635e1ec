"""``python -m personalize ...``: the ``personalize`` command (``python -m personalize.cli`` is the same, for
``torchrun`` / ``accelerate launch``)."""
from .cli.app import main

main()
