"""The toy world's base model factory: a tiny SD-1.x-shaped pipeline trained from scratch on the toy world."""
