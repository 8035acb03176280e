"""Token sampling and exact speculative verification.

Two halves:

* Logits processing (`SamplingParams`, `process_logits`, `probs`, `sample`, `greedy`): temperature, top-k
  and top-p applied in that order, the order Hugging Face `transformers` applies its warpers. Greedy
  decoding (temperature 0) is a separate path whose "distribution" is the one-hot of the argmax.
* Verification of a chain of K drafts against the target's K+1 next-token distributions
  (`verify_greedy`, `verify_stochastic`, `accepted_tokens`). Stochastic verification is the rejection
  scheme of Leviathan et al. 2023 / Chen et al. 2023: the emitted tokens are distributed exactly as if
  sampled from the target, whatever the drafter's distribution q, provided the drafts really were sampled
  from q. A greedy drafter is the special case q = one-hot(draft) (`probs` with temperature 0 gives that).

Everything has static shapes, is vectorised over leading axes and is safe under `jax.jit` with the
`SamplingParams` static (it is a frozen, hashable dataclass).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How a next token is chosen from logits.

  Attributes:
    temperature: logits are divided by it before softmax; 0 means greedy (argmax), in which case `top_k`
      and `top_p` are irrelevant (the argmax survives both) and ignored.
    top_k: keep only the k largest logits (and everything tied with the k-th); None disables it.
    top_p: nucleus sampling, keep the smallest set of most likely tokens whose probability reaches
      `top_p`; None or 1.0 disables it. Must lie in (0, 1].
  """

  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    t = self.temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
      raise ValueError(
          f"SamplingParams.temperature must be a finite number >= 0 (0 = greedy), got {t!r}.")
    k = self.top_k
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
      raise ValueError(f"SamplingParams.top_k must be None or an integer >= 1, got {k!r}.")
    p = self.top_p
    if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float))
                          or not (0.0 < p <= 1.0)):
      raise ValueError(f"SamplingParams.top_p must be None or a number in (0, 1], got {p!r}.")

  @property
  def is_greedy(self) -> bool:
    """True when tokens are chosen by argmax (temperature 0)."""
    return self.temperature == 0


def greedy(logits: jax.Array) -> jax.Array:
  """Argmax token (the first index among ties).

  Args:
    logits: [..., V].

  Returns:
    int32 [...].
  """
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _top_k_mask(x: jax.Array, k: int) -> jax.Array:
  """True for the logits to keep: everything >= the k-th largest (ties at the boundary survive)."""
  k = min(k, x.shape[-1])
  kth = jax.lax.top_k(x, k)[0][..., -1:]  # [..., 1]
  return x >= kth


def _top_p_mask(x: jax.Array, top_p: float) -> jax.Array:
  """True for the logits to keep under nucleus filtering.

  Follows `transformers`' TopPLogitsWarper: sort ascending, cumulative softmax, drop the tokens whose
  cumulative probability is <= 1 - top_p, always keep the largest. The warper then keeps a sort-order
  dependent subset of the tokens tied with the smallest kept value (torch's sort is not stable); here all
  of them are kept, so the kept set is a value threshold like top-k's, and equals the warper's whenever
  no tie straddles the boundary.
  """
  v = x.shape[-1]
  sorted_x = jnp.sort(x, axis=-1)  # ascending, [..., V]
  cum = jnp.cumsum(jax.nn.softmax(sorted_x, axis=-1), axis=-1)
  # cum is non-decreasing, so the removed tokens are a prefix of the sorted order; count it.
  num_removed = jnp.sum(cum <= 1.0 - top_p, axis=-1, keepdims=True)  # [..., 1]
  num_removed = jnp.minimum(num_removed, v - 1)
  threshold = jnp.take_along_axis(sorted_x, num_removed, axis=-1)  # smallest kept value, [..., 1]
  return x >= threshold


def process_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
  """Log-probabilities of the sampling distribution described by `params`.

  Temperature, then top-k, then top-p (the `transformers` order); filtered tokens get -inf. For greedy
  params the result is log of the one-hot of the argmax (0 there, -inf elsewhere).

  Args:
    logits: [..., V] any float dtype.
    params: static sampling parameters.

  Returns:
    float32 [..., V] normalised log-probabilities (logsumexp over V is 0).
  """
  x = logits.astype(jnp.float32)
  if params.is_greedy:
    onehot = jax.nn.one_hot(greedy(x), x.shape[-1], dtype=jnp.bool_)
    return jnp.where(onehot, 0.0, -jnp.inf)
  x = x / params.temperature
  if params.top_k is not None:
    x = jnp.where(_top_k_mask(x, params.top_k), x, -jnp.inf)
  if params.top_p is not None and params.top_p < 1.0:
    x = jnp.where(_top_p_mask(x, params.top_p), x, -jnp.inf)
  return jax.nn.log_softmax(x, axis=-1)


def probs(logits: jax.Array, params: SamplingParams) -> jax.Array:
  """The sampling distribution: float32 [..., V], one-hot of the argmax for greedy params."""
  return jnp.exp(process_logits(logits, params))


def sample(key: jax.Array, logits: jax.Array, params: SamplingParams) -> jax.Array:
  """Draws one token per row of `logits` [..., V]; returns int32 [...] (argmax for greedy params)."""
  if params.is_greedy:
    return greedy(logits)
  return jax.random.categorical(key, process_logits(logits, params), axis=-1).astype(jnp.int32)


def draw(key: jax.Array, logits: jax.Array, params: SamplingParams
         ) -> tuple[jax.Array, jax.Array | None]:
  """A draft token per row and the distribution it was drawn from, for exact verification.

  Args:
    logits: [..., V] drafter logits.
  Returns:
    (tokens int32 [...], q float32 [..., V] = `probs(logits, params)`; None for greedy params,
    whose q is the one-hot of the token).
  """
  if params.is_greedy:
    return greedy(logits), None
  q = probs(logits, params)
  return jax.random.categorical(key, jnp.log(q)).astype(jnp.int32), q


def _num_accepted(accept: jax.Array) -> jax.Array:
  """Length of the all-True prefix of `accept` [..., K] -> int32 [...]."""
  return jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


def verify_greedy(draft_tokens: jax.Array, target_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Greedy verification of a chain of K drafts.

  Draft j is accepted while every draft up to j equals the target's argmax at its position. The next
  token is the target's argmax at the first rejected position, or at position K (the bonus token) when
  all drafts are accepted. The output is token for token what greedy target-only decoding produces.

  Args:
    draft_tokens: int [B, K], the drafts d_0..d_{K-1}.
    target_logits: [B, K+1, V]; row j is the target's next-token logits after the prefix plus d_<j.

  Returns:
    (num_accepted int32 [B] in 0..K, next_token int32 [B]).
  """
  k = draft_tokens.shape[-1]
  if target_logits.shape[-2] != k + 1:
    raise ValueError(
        f"target_logits must have K+1 = {k + 1} positions for {k} drafts, got shape {target_logits.shape}.")
  target_tokens = greedy(target_logits)  # [B, K+1]
  num_accepted = _num_accepted(draft_tokens == target_tokens[..., :k])
  next_token = jnp.take_along_axis(target_tokens, num_accepted[..., None], axis=-1)[..., 0]
  return num_accepted, next_token


def verify_stochastic(
    key: jax.Array,
    draft_tokens: jax.Array,
    draft_probs: jax.Array,
    target_probs: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Exact (lossless) stochastic verification of a chain of K drafts (Leviathan et al. 2023).

  Draft j is accepted with probability min(1, p_j(d_j) / q_j(d_j)), sequentially: the first rejection
  stops the chain. On rejection at j the next token is drawn from normalize(max(0, p_j - q_j)); when all
  K drafts are accepted it is drawn from p_K (the bonus token). The emitted tokens are then distributed
  exactly as tokens sampled from p, one at a time, provided d_j was sampled from q_j. For greedy
  drafting pass q_j = one-hot(d_j).

  The residual max(0, p_j - q_j) has total mass equal to the rejection probability; when it is below
  1e-6 (p_j == q_j up to rounding, where a rejection can only come from rounding) p_j is used instead,
  which moves the emitted distribution by less than 1e-6 in total variation and avoids 0/0.

  Args:
    key: PRNG key, consumed.
    draft_tokens: int [B, K].
    draft_probs: [B, K, V]; q_j, the distribution d_j was sampled from.
    target_probs: [B, K+1, V]; p_j, the target's sampling distribution at each position (after the same
      temperature/top-k/top-p processing used for the final samples).

  Returns:
    (num_accepted int32 [B] in 0..K, next_token int32 [B]).
  """
  k = draft_tokens.shape[-1]
  if draft_probs.shape[-2] != k or target_probs.shape[-2] != k + 1:
    raise ValueError(
        f"for {k} drafts expected draft_probs [..., {k}, V] and target_probs [..., {k + 1}, V], got "
        f"{draft_probs.shape} and {target_probs.shape}.")
  if draft_probs.shape[-1] != target_probs.shape[-1]:
    raise ValueError(
        f"drafter and target vocabularies differ: {draft_probs.shape[-1]} vs {target_probs.shape[-1]}.")
  accept_key, resample_key = jax.random.split(key)
  q = draft_probs.astype(jnp.float32)
  p = target_probs.astype(jnp.float32)

  idx = draft_tokens[..., None].astype(jnp.int32)
  q_d = jnp.take_along_axis(q, idx, axis=-1)[..., 0]  # [B, K]
  p_d = jnp.take_along_axis(p[..., :k, :], idx, axis=-1)[..., 0]  # [B, K]
  u = jax.random.uniform(accept_key, q_d.shape, dtype=jnp.float32)  # [0, 1)
  # u < p/q without the division; also right at q == 0 (accept iff p > 0) and p == 0 (never accept).
  num_accepted = _num_accepted(u * q_d < p_d)

  # q at position K is zero, so the residual there is p_K itself: the bonus token needs no special case.
  q_ext = jnp.concatenate([q, jnp.zeros_like(q[..., :1, :])], axis=-2)  # [B, K+1, V]
  at = num_accepted[..., None, None]
  p_n = jnp.take_along_axis(p, at, axis=-2)[..., 0, :]  # [B, V]
  q_n = jnp.take_along_axis(q_ext, at, axis=-2)[..., 0, :]  # [B, V]
  residual = jnp.maximum(p_n - q_n, 0.0)
  mass = jnp.sum(residual, axis=-1, keepdims=True)
  dist = jnp.where(mass > 1e-6, residual / jnp.maximum(mass, 1e-30), p_n)
  next_token = jax.random.categorical(resample_key, jnp.log(dist), axis=-1).astype(jnp.int32)
  return num_accepted, next_token


def accepted_tokens(
    draft_tokens: jax.Array,
    num_accepted: jax.Array,
    next_token: jax.Array,
    *,
    pad: int = -1,
) -> jax.Array:
  """The tokens a verification round emits, padded to a static length.

  Args:
    draft_tokens: int [B, K].
    num_accepted: int [B] in 0..K.
    next_token: int [B], the correction or bonus token.
    pad: value after the emitted tokens.

  Returns:
    int32 [B, K+1]: d_0..d_{n-1}, next_token, pad... where n = num_accepted (n + 1 tokens emitted).
  """
  k = draft_tokens.shape[-1]
  pos = jnp.arange(k + 1, dtype=jnp.int32)
  n = num_accepted[..., None]
  drafts = jnp.concatenate(
      [draft_tokens.astype(jnp.int32), jnp.full_like(draft_tokens[..., :1], pad, dtype=jnp.int32)],
      axis=-1)
  return jnp.where(pos < n, drafts, jnp.where(pos == n, next_token[..., None].astype(jnp.int32), pad))
