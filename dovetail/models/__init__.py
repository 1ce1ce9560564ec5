"""Model files: fetching weights and prompt sets, loading tokenizers, the backend options."""
