"""The Nemotron-H model: one file per mixer, the block, and the model classes."""
