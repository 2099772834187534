"""Array ops for scoring: chunked token log-probs + entropy (never [B,T,V] at once)."""
from espo_jax.ops.logprobs import reference, token_logprobs_and_entropy

__all__ = ["token_logprobs_and_entropy", "reference"]
