"""Text generation shared by the teacher, evaluation and serving: engines (transformers, vLLM,
OpenAI-compatible), the continuous-batching decode loop, and the Ray actor pool that runs them."""
