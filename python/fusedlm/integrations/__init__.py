"""Integrations of fusedlm with other libraries.

* :mod:`fusedlm.integrations.transformers`: ``patch(model)`` / ``unpatch(model)`` make a
  Hugging Face causal LM compute its training loss with
  :func:`fusedlm.linear_cross_entropy` instead of materialising the logits.

Submodules are imported on demand, so ``import fusedlm`` never imports ``transformers``.
"""

__all__ = ["transformers"]
