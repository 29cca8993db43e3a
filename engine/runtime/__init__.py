"""The runtime core: tokenize, encode, denoise, decode, stage by stage inside a memory budget."""
