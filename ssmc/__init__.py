"""ssmc: a compiler for state-space models."""
__version__ = "0.1.0"

from ._platform import skip_absent_tpu  # noqa: E402

skip_absent_tpu()  # before anything starts jax's backends: no libtpu start-up noise on machines without a TPU

from .errors import SSMCError, ShapeError, SpecError, TargetError  # noqa: E402
from .api import Kernel, check, clear_cache, compile  # noqa: E402
from .state_cache import StateCache  # noqa: E402
from .shard import ShardedKernel, shard  # noqa: E402

__all__ = ["compile", "check", "clear_cache", "Kernel", "StateCache", "shard", "ShardedKernel", "SSMCError", "SpecError", "ShapeError", "TargetError", "__version__"]
