"""carnet: fine-tune timm ImageNet models to tell car models apart."""

import os

# albumentations asks PyPI for a newer version on import; carnet must work offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"

from carnet.config import register as _register_resolvers  # conf/ uses ${carnet.*:...}

_register_resolvers()
