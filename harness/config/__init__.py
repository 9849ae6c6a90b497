"""Configuration, torch-free: the spec and its file reader, every range, the vocabularies, the results-folder layout."""
