"""Adaptive decoding via Latent Preference Optimization (Dhuliawala et al., 2024).

A small head (:class:`AdaptiveDecoder`) on a frozen LM's last hidden state picks a decoding
temperature per reply (sequence level) or per token (token level); :func:`generate` decodes a
Hugging Face causal LM with those per-row temperatures through :func:`fusedlm.sample`;
:func:`lpo_loss` / :class:`LPOTrainer` train the head from best-vs-worst reply pairs.

    >>> from fusedlm.adaptive import AdaptiveDecoder, generate
    >>> head = AdaptiveDecoder(model.config.hidden_size, level="sequence")
    >>> out = generate(model, head, input_ids, attention_mask, max_new_tokens=64)
    >>> out.tokens, out.temperatures      # [B, n] tokens and the tau used for each

See docs/adaptive_decoding.md.
"""
from .generation import AdaptiveGeneration, generate, left_pad
from .head import DEFAULT_TEMPERATURES, AdaptiveDecoder
from .lpo import FORMS, dpo_loss, latent_sequence_logprob, lpo_loss, tau_sequence_logprob
from .trainer import LPOConfig, LPOTrainer, PreferencePairs, evaluate_rewards

__all__ = [
    "AdaptiveDecoder", "DEFAULT_TEMPERATURES", "AdaptiveGeneration", "generate", "left_pad",
    "lpo_loss", "dpo_loss", "tau_sequence_logprob", "latent_sequence_logprob", "FORMS",
    "LPOConfig", "LPOTrainer", "PreferencePairs", "evaluate_rewards",
]
