"""File formats: Hugging Face directories, GGUF files, AutoAWQ layouts, and the tensor name map between them and the
model."""
