"""Kernels for packed weights and compressed gradients.

Each kernel has a pure-torch reference with the same signature; the public function dispatches to
Triton on CUDA, to Triton under the interpreter when ``TRITON_INTERPRET=1``, and to the torch
reference otherwise.
"""
