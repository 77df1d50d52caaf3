"""captions: turn raw image-caption datasets into trained neural captioners.

Stages (each a ``captions`` sub-command and an importable function):
download -> prepare -> extract-features -> train -> evaluate / caption.
"""

__version__ = "0.1.0"
