"""ptools: a toolbox for people who train and ship PyTorch models.

The library lives in :mod:`ptools.core`; the command line in :mod:`ptools.cli`.
Importing ``ptools`` is cheap: nothing here imports torch.
"""

__version__ = "0.1.0"

from ptools.errors import (  # noqa: E402  (re-exported for library users)
    BadInputError,
    PtoolsError,
    RequirementNotMetError,
    UnsafeFileError,
)

__all__ = [
    "__version__",
    "PtoolsError",
    "BadInputError",
    "UnsafeFileError",
    "RequirementNotMetError",
]
