"""``python -m personalize.cli ...`` (what torchrun / accelerate launch start in every process)."""
from .app import main

main()
