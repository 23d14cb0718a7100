"""dpe-export: convert a RoPE LLM checkpoint into a checkpoint that runs DPE attention.

DPE is Dimension-wise Positional Embeddings Manipulation (arXiv 2504.18857). The exported checkpoint carries
generated ``trust_remote_code`` modeling files and loads with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.
"""

__version__ = "0.3.2"

__all__ = ["__version__"]
