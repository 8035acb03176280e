"""Static draft trees: topology, tree attention mask, exact greedy and stochastic verification.

A round with a tree drafts several candidates per node and verifies all N nodes in one target
forward (experiments/tree_drafting_design.md). Nodes are numbered in BFS order; node 0 is the
root, the round's last emitted token (no K/V yet); the children of a node are its candidates in
rank order (rank 0 = the drafter's best). A chain of K drafts is the tree `TreeSpec.chain(K)`.

Verification walks down from the root and returns the accepted path (node indices, root first),
the number of accepted drafts `n` and the next token (correction, or bonus at a leaf):
  greedy: move to the child whose token is the target's argmax, stop when none is;
  stochastic: recursive rejection sampling over the children (Leviathan et al. applied to each
    candidate in turn, the target distribution replaced by the normalised residual after each
    rejection; SpecInfer with i.i.d. candidates, Jeon et al. "Recursive Speculative Decoding"
    without replacement). The emitted tokens are distributed exactly as target-only sampling.

Trees enter the speculative loop as buckets (`speculative.SpecConfig(trees=...)`, after the chain
buckets); the nodes are drafted by the drafter kind's `draft_tree` (`drafter_kinds`: the MTP
assistant with the 'clean' convention), verified by one `model.forward(..., tree=)`, and the
accepted path's K/V is moved into place by `kv_cache.compact`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from gemma_mtp import layers
from gemma_mtp import sampling

F32 = jnp.float32
# How the children of a node were drawn from the drafter distribution q of the node:
WITHOUT_REPLACEMENT = "without_replacement"  # Gumbel top-k: sequential sampling w/o replacement
WITH_REPLACEMENT = "with_replacement"        # i.i.d. samples of q
DETERMINISTIC = "deterministic"              # top-k of q (greedy drafter); q_i = one-hot(c_i)
MODES = (WITHOUT_REPLACEMENT, WITH_REPLACEMENT, DETERMINISTIC)


@dataclasses.dataclass(frozen=True)
class TreeSpec:
  """A static draft tree (hashable: a static argument under jit).

  Attributes:
    parents: parent of each node in BFS order; parents[0] = -1 (the root), parents[n] < n,
      depths non-decreasing and parents non-decreasing along the list (so each level and each
      node's children are contiguous, children in rank order).
  """

  parents: tuple[int, ...]

  def __post_init__(self):
    object.__setattr__(self, "parents", tuple(int(q) for q in self.parents))  # hashable
    p = self.parents
    if not p or p[0] != -1 or any(q == -1 for q in p[1:]):
      raise ValueError(f"parents must start with -1 (the root) and have one root, got {p}")
    if any(not 0 <= q < n for n, q in enumerate(p) if n):
      raise ValueError(f"parents[n] must be in [0, n) for n > 0, got {p}")
    if any(b < a for a, b in zip(p[1:], p[2:])):
      raise ValueError(f"nodes must be in BFS order (non-decreasing parents), got {p}")

  @classmethod
  def from_widths(cls, widths) -> "TreeSpec":
    """Every node at depth d has widths[d] children, e.g. (2, 2, 1): 1 + 2 + 4 + 4 = 11 nodes."""
    if not widths or any(w < 1 for w in widths):
      raise ValueError(f"widths must be positive, got {widths}")
    parents, level = [-1], [0]
    for w in widths:
      nxt = []
      for v in level:
        for _ in range(w):
          nxt.append(len(parents))
          parents.append(v)
      level = nxt
    return cls(tuple(parents))

  @classmethod
  def chain(cls, k: int) -> "TreeSpec":
    return cls.from_widths((1,) * k)

  @classmethod
  def parse(cls, text: str) -> "TreeSpec":
    """A tree from compact text: widths per depth, '3,2,1,1' or '3-2-1-1' (`from_widths`), or a
    `label`, 'tree(3,2,1,1)' or 'tree[-1,0,0,1]' (parents), so that records' labels parse back."""
    body = text.strip()
    explicit = body.startswith("tree[") and body.endswith("]")
    if explicit or (body.startswith("tree(") and body.endswith(")")):
      body = body[5:-1]
    try:
      numbers = tuple(int(x) for x in (body if explicit else body.replace("-", ",")).split(","))
    except ValueError:
      raise ValueError(f"a tree is widths per depth like '3,2,1,1' or '3-2-1-1', or a label like "
                       f"'tree(3,2,1)' or 'tree[-1,0,0,1]'; got {text!r}") from None
    return cls(numbers) if explicit else cls.from_widths(numbers)

  @property
  def num_nodes(self) -> int:
    return len(self.parents)

  @functools.cached_property
  def label(self) -> str:
    """'tree(2,2,1)' for a tree of uniform widths per depth, else 'tree[parents]'."""
    w = self.widths()
    if w is not None:
      return "tree(" + ",".join(map(str, w)) + ")"
    return "tree[" + ",".join(map(str, self.parents)) + "]"

  def widths(self) -> tuple[int, ...] | None:
    """Children per node at each depth if uniform within every depth, else None."""
    counts = (self.children >= 0).sum(axis=1)
    out = []
    for lo, hi in self.levels[:-1]:
      level = set(counts[lo:hi].tolist())
      if len(level) != 1:
        return None
      out.append(level.pop())
    return tuple(out)

  @functools.cached_property
  def depth(self) -> np.ndarray:
    """[N] int32 depth of each node (root 0)."""
    d = np.zeros(self.num_nodes, np.int32)
    for n in range(1, self.num_nodes):
      d[n] = d[self.parents[n]] + 1
    return d

  @property
  def max_depth(self) -> int:
    return int(self.depth.max())

  @property
  def max_width(self) -> int:
    """The most children of one node (1 for a chain)."""
    return int((self.children >= 0).sum(axis=1).max())

  @functools.cached_property
  def children(self) -> np.ndarray:
    """[N, Bmax] int32 children of each node in rank order, -1 padded (Bmax >= 1)."""
    kids = [[] for _ in self.parents]
    for n, q in enumerate(self.parents[1:], start=1):
      kids[q].append(n)
    width = max(1, max(len(k) for k in kids))
    return np.array([k + [-1] * (width - len(k)) for k in kids], np.int32)

  @functools.cached_property
  def rank(self) -> np.ndarray:
    """[N] int32 rank of each node among its siblings (root 0)."""
    r = np.zeros(self.num_nodes, np.int32)
    for row in self.children:
      for i, c in enumerate(row):
        if c >= 0:
          r[c] = i
    return r

  @functools.cached_property
  def ancestors(self) -> np.ndarray:
    """[N, N] bool: ancestors[n, m] = m is n or an ancestor of n (what node n attends to)."""
    a = np.eye(self.num_nodes, dtype=bool)
    for n in range(1, self.num_nodes):
      a[n] |= a[self.parents[n]]
    return a

  @functools.cached_property
  def levels(self) -> tuple[tuple[int, int], ...]:
    """(start, stop) node range of each depth."""
    out, d = [], self.depth
    for k in range(self.max_depth + 1):
      idx = np.nonzero(d == k)[0]
      out.append((int(idx[0]), int(idx[-1]) + 1))
    return tuple(out)

  def expected_tokens(self, acceptance: jax.Array) -> jax.Array:
    """Tokens per round if every candidate is accepted with probability a independently of its
    rank: 1 + sum over nodes of P(reach the node). A chain gives (1 - a^(K+1)) / (1 - a)."""
    reach = [jnp.ones((), F32)]
    for n in range(1, self.num_nodes):
      reach.append(reach[self.parents[n]] * (1.0 - acceptance) ** int(self.rank[n]) * acceptance)
    return sum(reach)

  def value(self, acceptance: jax.Array, *, draft_cost: float, node_cost: float,
            verify_cost: float = 1.0) -> jax.Array:
    """Expected tokens per unit of cost at per-candidate acceptance a (the adaptive rule):
    expected_tokens(a) / (verify_cost + depth c + extra nodes node_cost), where verify_cost is
    the verification of a chain of the same depth and the extra nodes are those beyond it. A
    chain gives `speculative.best_bucket`'s chain value."""
    extra = self.num_nodes - self.max_depth - 1
    return self.expected_tokens(acceptance) / (verify_cost + self.max_depth * draft_cost
                                               + extra * node_cost)


def attention_mask(q_idx: jax.Array, kv_idx: jax.Array, start: jax.Array, *, window: int | None,
                   chunk_start: jax.Array, tree: TreeSpec) -> jax.Array:
  """Tree attention mask of a chunk written at indices chunk_start + (0..N-1).

  Keys before the chunk (committed) follow the causal / sliding rule at the node's logical index
  q_idx = chunk_start + depth; a key inside the chunk is visible to its node and the node's
  descendants only (sliding layers: within the window, measured in depth, as on a chain); keys
  after the chunk (stale scratch of earlier rounds) are invisible.

  Args:
    q_idx: [B, N] logical sequence index of each node.
    kv_idx: [B, S] index held by each key slot (-1: empty).
    start: [B] first real index; chunk_start: [B] index of the root's slot.
  Returns:
    [B, N, S] bool.
  """
  n = tree.num_nodes
  committed = kv_idx[:, None, :] < chunk_start[:, None, None]
  mask = committed & layers.attention_mask(q_idx, kv_idx, start, window=window)
  rel = kv_idx - chunk_start[:, None]                                     # [B, S]
  in_chunk = (rel >= 0) & (rel < n)
  sees = tree.ancestors                                                   # [N, N] static
  if window is not None:
    sees = sees & (tree.depth[:, None] - tree.depth[None, :] < window)
  anc = jnp.take(jnp.asarray(sees), jnp.clip(rel, 0, n - 1), axis=1)     # [N, B, S]
  return mask | (in_chunk[:, None, :] & jnp.moveaxis(anc, 0, 1))


def _children_of(tree: TreeSpec, v: jax.Array) -> jax.Array:
  return jnp.asarray(tree.children)[v]                                   # [B, Bmax]


def verify_greedy(tokens: jax.Array, target_logits: jax.Array, *, tree: TreeSpec):
  """Greedy verification of a tree.

  Args:
    tokens: [B, N] int32 node tokens (node 0: the root's token, unused).
    target_logits: [B, N, V]; row n is the target's next-token logits after the path to n.
  Returns:
    (path [B, Dm + 1] int32 node indices (root first; repeats the last node after the stop),
     num_accepted [B] int32, next_token [B] int32, num_rejected [B] int32 candidates compared
     and rejected).
  """
  b = tokens.shape[0]
  rows = jnp.arange(b)
  best = sampling.greedy(target_logits)                                  # [B, N]
  v = jnp.zeros((b,), jnp.int32)
  alive = jnp.ones((b,), bool)
  num = jnp.zeros((b,), jnp.int32)
  rejected = jnp.zeros((b,), jnp.int32)
  path = [v]
  for _ in range(tree.max_depth):
    ch = _children_of(tree, v)                                           # [B, Bmax]
    tok = jnp.take_along_axis(tokens, jnp.maximum(ch, 0), axis=1)
    valid = ch >= 0
    match = valid & (tok == best[rows, v][:, None])
    found = alive & jnp.any(match, axis=-1)
    first = jnp.argmax(match, axis=-1)
    # Candidates ranked before the match, or all of them when none matched, were rejected.
    tried = jnp.where(found, first, jnp.sum(valid, axis=-1))
    rejected = rejected + jnp.where(alive, tried, 0)
    v = jnp.where(found, ch[rows, first], v)
    num = num + found
    alive = found
    path.append(v)
  return jnp.stack(path, axis=1), num, best[rows, v], rejected


def verify_stochastic(key: jax.Array, tokens: jax.Array, draft_probs: jax.Array | None,
                      target_probs: jax.Array, *, tree: TreeSpec,
                      mode: str = WITHOUT_REPLACEMENT):
  """Exact stochastic verification of a tree (recursive rejection sampling over siblings).

  At the current node v with target distribution p (= p_v), for each child c_i in rank order:
  accept with probability min(1, p(c_i) / q_i(c_i)), else p <- normalize(max(0, p - q_i)); q_i is
  the distribution c_i was drawn from (see `mode`). If a child is accepted, continue from it; if
  none is (or v is a leaf) the next token is drawn from the current p. A residual of mass < 1e-6
  (p == q_i up to rounding) falls back to p, as `sampling.verify_stochastic` does.

  Args:
    key: PRNG key, consumed.
    tokens: [B, N] int32 node tokens.
    draft_probs: [B, N, V]; row v is q_v, the drafter distribution the children of v were drawn
      from (rows of leaves are ignored). Unused for mode DETERMINISTIC (may be None).
    target_probs: [B, N, V]; p_v, the target's sampling distribution after the path to v.
    mode: how the children were drawn: WITHOUT_REPLACEMENT (q_i = q_v restricted to tokens not
      yet drawn, renormalised; candidates with q_i = 0 were not drawn and are skipped),
      WITH_REPLACEMENT (q_i = q_v) or DETERMINISTIC (fixed candidates, q_i = one-hot(c_i)).
  Returns:
    (path [B, Dm + 1], num_accepted [B], next_token [B], num_rejected [B]) as `verify_greedy`.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  b, _, vocab = target_probs.shape
  rows = jnp.arange(b)
  p_all = target_probs.astype(F32)
  q_all = None if mode == DETERMINISTIC else draft_probs.astype(F32)
  bmax = tree.children.shape[1]
  u_key, s_key = jax.random.split(key)
  u = jax.random.uniform(u_key, (tree.max_depth, bmax, b), F32)
  s_keys = jax.random.split(s_key, tree.max_depth + 1)
  ids = jnp.arange(vocab)

  v = jnp.zeros((b,), jnp.int32)
  alive = jnp.ones((b,), bool)
  num = jnp.zeros((b,), jnp.int32)
  rejected = jnp.zeros((b,), jnp.int32)
  nxt = jnp.zeros((b,), jnp.int32)
  path = [v]
  for d in range(tree.max_depth + 1):
    p = p_all[rows, v]                                                   # [B, V]
    q_v = None if q_all is None else q_all[rows, v]
    avail = jnp.ones((b, vocab), bool)
    chosen = jnp.full((b,), -1, jnp.int32)
    ch = _children_of(tree, v) if d < tree.max_depth else jnp.full((b, 1), -1, jnp.int32)
    for r in range(ch.shape[1] if d < tree.max_depth else 0):
      c = ch[:, r]
      tok = tokens[rows, jnp.maximum(c, 0)]
      onehot = ids[None, :] == tok[:, None]
      if mode == DETERMINISTIC:
        q_i = onehot.astype(F32)
      elif mode == WITH_REPLACEMENT:
        q_i = q_v
      else:
        masked = jnp.where(avail, q_v, 0.0)
        q_i = masked / jnp.maximum(jnp.sum(masked, axis=-1, keepdims=True), 1e-30)
      q_c = jnp.sum(jnp.where(onehot, q_i, 0.0), axis=-1)
      p_c = jnp.sum(jnp.where(onehot, p, 0.0), axis=-1)
      valid = alive & (chosen < 0) & (c >= 0) & (q_c > 0)
      accept = valid & (u[d, r] * q_c < p_c)
      reject = valid & ~accept
      chosen = jnp.where(accept, c, chosen)
      residual = jnp.maximum(p - q_i, 0.0)
      mass = jnp.sum(residual, axis=-1, keepdims=True)
      p_new = jnp.where(mass > 1e-6, residual / jnp.maximum(mass, 1e-30), p)
      p = jnp.where(reject[:, None], p_new, p)
      avail = avail & ~(valid[:, None] & onehot)
      rejected = rejected + reject
    found = alive & (chosen >= 0)
    stop = alive & ~found
    sample = jax.random.categorical(s_keys[d], jnp.log(p), axis=-1).astype(jnp.int32)
    nxt = jnp.where(stop, sample, nxt)
    if d < tree.max_depth:
      v = jnp.where(found, chosen, v)
      num = num + found
      path.append(v)
    alive = found
  return jnp.stack(path, axis=1), num, nxt, rejected


def draw_children(key: jax.Array | None, logits: jax.Array, *, k: int,
                  sampler: sampling.SamplingParams):
  """k distinct candidate tokens per query and the distribution they were drawn from.

  Greedy sampler: the top-k of the logits (mode DETERMINISTIC, q = None). Otherwise a sample
  without replacement of the processed distribution q (Gumbel top-k).

  Args:
    logits: [..., V] drafter logits.
  Returns:
    (tokens [..., k] int32, q [..., V] float32 or None).
  """
  if sampler.is_greedy:
    return jax.lax.top_k(logits.astype(F32), k)[1].astype(jnp.int32), None
  q = sampling.probs(logits, sampler)
  g = jax.random.gumbel(key, q.shape, F32)
  return jax.lax.top_k(jnp.log(q) + g, k)[1].astype(jnp.int32), q


__all__ = ["TreeSpec", "attention_mask", "verify_greedy", "verify_stochastic", "draw_children",
           "MODES", "WITHOUT_REPLACEMENT", "WITH_REPLACEMENT", "DETERMINISTIC"]
