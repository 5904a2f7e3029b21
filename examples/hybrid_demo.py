"""Run a small hybrid transformers model (Qwen3-Next, random weights) through portable_attn on the best backend
here, beside transformers' own torch path: `python examples/hybrid_demo.py [--dtype bf16] [--backend cpu]`."""
import sys

from portable_attn.integrations.demo import main

if __name__ == "__main__":
    sys.exit(main())
