"""Serving engines that run DPE exports with DPE attention (the export's runtime, not a copy of it).

dpe_export.serving.vllm is a vLLM plugin (`pip install 'dpe-export[vllm]'`); docs/vllm-design.md explains it.
"""
