"""ssmc: a compiler for state-space models."""
from .errors import SSMCError, ShapeError, SpecError, TargetError

__version__ = "0.1.0"

try:  # the API module is optional while the package is being built up
    from .api import Kernel, check, compile  # noqa: F401
except ImportError:  # pragma: no cover
    pass
