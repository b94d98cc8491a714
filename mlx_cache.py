"""LocalAI's file name for the prompt cache: the code is `mlx_backend.prompt_cache`."""

from mlx_backend.prompt_cache import *  # noqa: F401,F403
from mlx_backend.prompt_cache import __all__  # noqa: F401
