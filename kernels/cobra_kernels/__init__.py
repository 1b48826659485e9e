"""Fused kernels for cobra_scale (see kernels/README.md).

The importable package is ``cobra_kernels`` (nested under the top-level
``kernels/`` folder) so that it never shadows Hugging Face's ``kernels``
package, which ``transformers`` probes for.
"""
