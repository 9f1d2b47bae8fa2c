"""mailpool: a mail host on Trio with prestart job pools and a binary journal."""

__version__ = "0.1.0"
