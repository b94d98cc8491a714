"""MLX serving engine behind the LocalAI gRPC backend (see backend.py)."""
