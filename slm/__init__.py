"""slm: build a small language model end to end and run it on ordinary hardware."""

__version__ = "0.1.0"
