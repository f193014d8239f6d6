"""Prompt initialisers, one module each, selected by `init.name` in params.yaml (registry: base.py).

Each takes the freshly built method (holding its seeded random init), the
statistics of task 0's data that the features and prototypes stages computed
once, the `init` section and a seed. Token initialisers fill the slots a method
declares with `token_slots()` (VPT: N tokens per prompted block; APT: one token
per block, turned into its key/value; L2P: the pool, entering block 0) and hand
them over with `set_slot_tokens()`, so one initialiser serves every method.

Stats: "class_features" (C, D) and "block_class_tokens" (depth, C, D) are
task 0's class means; "block_token_sample" (depth, images, patches, D) holds
every patch token entering every block for a sample of task 0's images.
"""

from promptcil.init.base import INITIALISERS, initialise, register_initialiser

__all__ = ["INITIALISERS", "initialise", "register_initialiser"]
