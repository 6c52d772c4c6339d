"""MatFormer training of the small Gemma 3n that ships as the default model (`python -m g3n_export.training`)."""
