"""spoold: a systemd-managed daemon that runs OpenAI-Batch JSONL drops through vLLM."""

__version__ = "0.1.0"
