"""A*-PO: two-stage RL for LLM math reasoning (optimal advantage regression)."""

__version__ = "0.1.0"
