"""β shipped with the server for the built-in task, so that a first start serves it with β at once.

Learning the built-in task's β from its pool takes minutes on a CPU, and a first start would serve
without it until then. The file in `server/data/` is named by the task's shipped-β key
(`anchor_cache.blobs.shipped_beta_key`): the task's template, labels, demonstrations and method,
and the default model's weights and tokenizer, in any dtype. It serves a task with a pool (and
`reweight` on) when all of those match. A task whose pool differs serves it until the β learned from
its own pool, in the background, replaces it; any other task or model learns β without it, and a
task without a pool, or with `reweight: false`, serves without β.

    python -m server.shipped     # learn it again and replace the file (a few minutes)

Run it after changing the built-in task or the default model; tests/test_real_model.py fails until then.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tqdm import tqdm

from anchor_cache.blobs import cache_identity, shipped_beta_file, shipped_beta_key
from anchor_cache.classifier import Classifier
from anchor_cache.models import load_model
from anchor_cache.names import DEFAULT_MODEL
from anchor_cache.reweighting import learn_pool_beta
from server.settings import builtin_task
from server.store.local import write_atomic

log = logging.getLogger(__name__)

SHIPPED_BETAS = Path(__file__).parent / "data"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.shipped", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto", help="the dtype β is learned in (it serves in any)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    lm = load_model(DEFAULT_MODEL, device="cpu", dtype=args.dtype)
    spec = builtin_task()
    clf = Classifier(lm, spec)
    key = shipped_beta_key(cache_identity(lm, clf.prompt, spec.method, clf.seed), lm)
    with tqdm(desc="learning β", unit="step") as bar:
        def step(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        beta, info = learn_pool_beta(clf, on_step=step)
    for old in SHIPPED_BETAS.glob("*.beta.safetensors"):
        old.unlink()
    name, data = shipped_beta_file(key, beta, info)
    file = SHIPPED_BETAS / name
    write_atomic(file, lambda tmp: tmp.write_bytes(data))
    log.info("wrote %s (learned in %.0f s, loss %s -> %s)", file, info["seconds"], info["epoch_losses"][0],
             info["epoch_losses"][-1])


if __name__ == "__main__":
    main()
