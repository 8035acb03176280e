r"""Does training a drafter on a new domain raise its acceptance there?

The target is fixed (default: the demo target, which saw the stdlib and `transformers`' source).
Two drafters of the same size are distilled from scratch with the same budget: one on the stdlib
only, one on the new domain's train split. Both are evaluated (greedy, K = 4 and adaptive) on the
new domain's held-out files and on the stdlib's held-out files.

  python experiments/new_domain.py --domain=site-packages/transformers \
      --out=experiments/results/new_domain_cpu.json
"""

import hashlib
import sysconfig

from absl import app
from absl import flags
from absl import logging
import jax

from gemma_mtp import api
from gemma_mtp import data
from gemma_mtp import demo
from gemma_mtp import distill
from gemma_mtp import drafter as drafter_lib
from gemma_mtp import metrics
from gemma_mtp import pipeline

_DOMAIN = flags.DEFINE_string("domain", "site-packages/transformers", "folder of the new domain")
_STEPS = flags.DEFINE_integer("steps", 150, "distillation steps per drafter")
_BATCH = flags.DEFINE_integer("batch_size", 8, "sequences per step")
_SEQ = flags.DEFINE_integer("seq_len", 256, "training sequence length")
_EMBED = flags.DEFINE_integer("embed_dim", 128, "drafter width")
_LAYERS = flags.DEFINE_integer("num_layers", 2, "drafter layers")
_PROMPTS = flags.DEFINE_integer("prompts", 16, "held-out prompts per domain")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "new tokens per prompt")
_OUT = flags.DEFINE_string("out", None, "JSON record path")


def _split(files, frac=0.05):
  key = lambda f: int(hashlib.sha1(f.relpath.encode()).hexdigest()[:8], 16) / 2**32
  return [f for f in files if key(f) >= frac], [f for f in files if key(f) < frac]


def _tokens(files, tok, max_bytes=8_000_000):
  docs, total = [], 0
  for f in files:
    if total > max_bytes:
      break
    docs.append(f.path.read_text(encoding="utf-8"))
    total += f.size
  return data.tokenize_documents(docs, tok)


def main(argv):
  del argv
  target, _, tok = demo.load_demo()
  tcfg = target.config
  domain = _DOMAIN.value
  root = (sysconfig.get_paths()["purelib"] + domain[len("site-packages"):]
          if domain.startswith("site-packages") else domain)
  dom_train, dom_eval = _split(data.build_corpus([root], eval_fraction=0.0).train_files)
  std = data.build_corpus()
  sets = {"stdlib": _tokens(std.train_files, tok), domain: _tokens(dom_train, tok)}
  evals = {"stdlib": _tokens(std.eval_files, tok), domain: _tokens(dom_eval, tok)}
  prompts = {k: pipeline.eval_prompts(v, num=_PROMPTS.value, prompt_len=64)
             for k, v in evals.items()}
  dcfg = drafter_lib.for_target(tcfg, embed_dim=_EMBED.value, num_heads=4,
                                mlp_dim=4 * _EMBED.value, num_layers=_LAYERS.value)
  record = {"kind": "new_domain", "domain": domain, "steps": _STEPS.value,
            "drafter": {"embed_dim": _EMBED.value, "num_layers": _LAYERS.value},
            "results": {}}
  for trained_on, toks in sets.items():
    loader = data.Loader(data.pack(toks, seq_len=_SEQ.value), batch_size=_BATCH.value)

    def loss(p, batch, rng):
      del rng
      return distill.drafter_loss(p, dcfg=dcfg, tparams=target.params, tcfg=tcfg,
                                  tokens=batch["tokens"], steps=4,
                                  step_weights=(1.0, 0.8, 0.6, 0.4))

    params, hist, _ = pipeline.train_model(
        jax.tree_util.Partial(loss), drafter_lib.init_params(dcfg, jax.random.PRNGKey(0)),
        loader, seconds=0, lr=3e-3, warmup=20, seed=0, steps=_STEPS.value)
    drafter = api.Drafter(dcfg, params)
    for evaluated_on, ps in prompts.items():
      res = pipeline.evaluate_pair(target, drafter, ps, max_new_tokens=_MAX_NEW.value,
                                   acceptance_runs=[(0.0, (4,), False),
                                                    (0.0, (1, 2, 4, 8), True)])
      record["results"][f"trained_on={trained_on} evaluated_on={evaluated_on}"] = [
          {k: e[k] for k in ("draft_lengths", "adaptive", "tokens_per_forward",
                             "acceptance_by_position")} for e in res["acceptance"]]
      logging.info("trained on %s, evaluated on %s: %s", trained_on, evaluated_on,
                   [round(e["tokens_per_forward"], 2) for e in res["acceptance"]])
  if _OUT.value:
    metrics.write_record(_OUT.value, record)


if __name__ == "__main__":
  app.run(main)
