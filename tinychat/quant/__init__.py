"""Quantization: group-wise integer math (quantize.py) and the AWQ search (awq.py)."""
