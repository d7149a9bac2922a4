"""Split LoRA fine-tuning of Hugging Face causal LMs: model splitting, the split step and its wire message, LoRA
nodes, the trainer, data, model loading, evaluation and measurement. Source: docs/split-training.md."""
