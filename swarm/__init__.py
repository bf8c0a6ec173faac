"""swarm: fine-tune large language models on the consumer GPUs you already own."""

__version__ = "0.1.0"
