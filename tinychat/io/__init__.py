"""Models on disk: the formats (Hugging Face directories, GGUF files, AutoAWQ layouts, the tensor name map between
them and the model), the loader (one header read per source, a LoadedModel record) and the checkpoint writer."""
