"""promptcil: rehearsal-free class-incremental learning with prompts on a frozen Vision Transformer.

The library holds the algorithms and I/O helpers only; DVC stages (stages/) and Prefect flows
(flows/) orchestrate it, and it never imports them.
"""

__version__ = "0.1.0"
