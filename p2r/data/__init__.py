"""Data: record schema, video decoding, prompts, shards and the WebDataset DataModule."""
