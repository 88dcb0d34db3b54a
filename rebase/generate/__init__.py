"""Text generation shared by the teacher, evaluation and serving: `engines` (the Engine interface and the
transformers, vLLM and OpenAI-compatible engines), `batching` (the transformers engine's continuous-batching
decode loop and its KV-cache layout) and `pool` (the Ray Data actor pool that runs engines, answers cached)."""
