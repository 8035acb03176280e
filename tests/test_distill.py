"""Drafter distillation: training unrolls the drafter exactly as the speculative loop runs it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gemma_mtp
from gemma_mtp import config as config_lib
from gemma_mtp import distill
from gemma_mtp import drafter as drafter_lib
from tests.test_speculative import Drafter

TARGET = config_lib.tiny(layer_types=config_lib.pattern(5, 3), num_kv_shared_layers=1,
                         per_layer_dim=8, per_layer_vocab_size=256, sliding_window=6)


@pytest.mark.parametrize("convention", ["hf", "clean"])
def test_training_unroll_reproduces_inference_drafts(convention):
  """The first round after a prefill drafts d_1..d_K; the training unroll anchored at the last
  prompt position, fed the same tokens, predicts exactly those drafts at steps 0..K-1."""
  target = gemma_mtp.random_target(TARGET, seed=1)
  dcfg = drafter_lib.for_target(TARGET, embed_dim=32, num_heads=4, mlp_dim=64,
                                convention=convention)
  dparams = drafter_lib.init_params(dcfg, jax.random.PRNGKey(3))
  k = 5
  for prompt_len in (4, 13):  # shorter and longer than the window
    prompt = list(range(10, 10 + prompt_len))
    out = gemma_mtp.generate(target, [prompt], max_new_tokens=k + 2,
                             drafter=Drafter(dcfg, dparams), draft_lengths=(k,),
                             adaptive=False, return_drafts=True)
    drafts = out.stats["drafts"][0][0]
    first = out.tokens[0][0]
    seq = jnp.asarray([prompt + [first] + drafts], jnp.int32)
    # The unroll of drafter_loss, at the anchor t = prompt_len - 1.
    fwd = gemma_mtp.model.forward(target.params, seq, config=TARGET)
    masks, query = distill.training_masks(fwd.taps, dcfg=dcfg, window=TARGET.sliding_window,
                                          start=jnp.zeros(1, jnp.int32), length=seq.shape[1])
    hidden, predicted = fwd.hidden, []
    for j in range(k):
      logits, hidden = drafter_lib.step_seq(
          dparams, dcfg, target_params=target.params, target_config=TARGET,
          tokens=distill.shift_left(seq, 1 + j), hidden=hidden, query_pos=query, taps=fwd.taps,
          masks=masks)
      predicted.append(int(jnp.argmax(logits[0, prompt_len - 1])))
    assert predicted == drafts


def test_distillation_raises_agreement():
  target = gemma_mtp.random_target(TARGET, seed=2)
  dcfg = drafter_lib.for_target(TARGET, embed_dim=32, num_heads=4, mlp_dim=64)
  dparams = drafter_lib.init_params(dcfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  # Target-generated text, so there is something to learn.
  prompts = [list(rng.integers(3, 256, size=4)) for _ in range(8)]
  seqs = gemma_mtp.generate(target, prompts, max_new_tokens=28).tokens
  tokens = jnp.asarray([p + s for p, s in zip(prompts, seqs)], jnp.int32)
  opt = optax.adam(3e-3)
  state = opt.init(dparams)
  kw = dict(dcfg=dcfg, tparams=target.params, tcfg=TARGET, tokens=tokens, steps=3,
            step_weights=(1.0, 0.7, 0.5))

  @jax.jit
  def update(p, s):
    (loss, m), g = jax.value_and_grad(lambda p: distill.drafter_loss(p, **kw), has_aux=True)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss, m

  _, _, first_loss, first = update(dparams, state)
  for _ in range(60):
    dparams, state, loss, m = update(dparams, state)
  assert float(loss) < 0.5 * float(first_loss)
  assert float(m["agree_step_0"]) > float(first["agree_step_0"]) + 0.3


def test_bad_settings_raise():
  target = gemma_mtp.random_target(TARGET)
  dcfg = drafter_lib.for_target(TARGET, embed_dim=32, num_heads=4, mlp_dim=64)
  p = drafter_lib.init_params(dcfg, jax.random.PRNGKey(0))
  tokens = jnp.zeros((1, 8), jnp.int32)
  with pytest.raises(ValueError, match="step_weights"):
    distill.drafter_loss(p, dcfg=dcfg, tparams=target.params, tcfg=TARGET, tokens=tokens,
                         steps=2, step_weights=(1.0,))
  with pytest.raises(ValueError, match="loss_type"):
    distill.drafter_loss(p, dcfg=dcfg, tparams=target.params, tcfg=TARGET, tokens=tokens,
                         steps=1, step_weights=(1.0,), loss_type="mse")
