"""Why did N-FGSM training at 8/255 (at_8_4ep) collapse? One-off diagnosis, CPU.

    GBJAX_DATA_DIR=../shared/data python diagnose_at8.py /work/runs/adaptive_quick_at4ep

Scores each adversarially trained model of the run on the same 1,000 random test
images: eval mode (running BatchNorm statistics) on clean images, on images with
N-FGSM's start noise alone (uniform in [-2 eps, 2 eps]) and on N-FGSM images built
against the model with the true label; and train mode (batch statistics) on clean
images. Output: diagnose_at8.txt beside this file.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from gbjax import attacks, data, models, train

run = sys.argv[1]
xte, yte = data.load("cifar10", "test", data_dir=None, progress=False)
idx = np.random.default_rng(0).permutation(len(xte))[:1000]
x, y = jnp.asarray(xte[idx], jnp.float32) / 255.0, jnp.asarray(yte[idx])


def acc(model, images):
    correct = [
        jnp.argmax(model(images[i : i + 250]), -1) == y[i : i + 250] for i in range(0, 1000, 250)
    ]
    return float(jnp.mean(jnp.concatenate(correct)))


for name, eps in (("at_2_4ep", 2 / 255), ("at_8_4ep", 8 / 255)):
    m = train.restore_model(f"{run}/checkpoints/{name}_seed0")
    models.in_float32(m)
    m.eval()
    noise = jax.random.uniform(jax.random.key(1), x.shape, jnp.float32, -2 * eps, 2 * eps)
    start = jnp.clip(x + noise, 0, 1)
    grad = jax.grad(lambda z, m=m: jnp.sum(attacks.attack_loss(m, z, y)))(start)
    nfgsm = jnp.clip(start + eps * jnp.sign(grad), 0, 1)
    pred = np.bincount(np.asarray(jnp.argmax(m(x[:500]), -1)), minlength=10)
    row = dict(clean_eval=acc(m, x), start_noise_eval=acc(m, start), nfgsm_eval=acc(m, nfgsm))
    m.train()
    row["clean_train_mode"] = acc(m, x)
    print(name, {k: round(v, 3) for k, v in row.items()}, "clean predictions per class:", pred)
