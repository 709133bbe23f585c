"""ResNet-18 (CIFAR variant) on our CIFAR-10 (JPEG), fast one-cycle recipe.

    python -m gbjax.train --config gbjax/configs/resnet18_cifar10.py --workdir /tmp/r18
    python -m gbjax.train --config gbjax/configs/resnet18_cifar10.py:resnet20 --workdir /tmp/r20
    python -m gbjax.train --config gbjax/configs/resnet18_cifar10.py:smoke --workdir /tmp/r_s
    # granular-ball preprocessed train and test images (cached after the first run):
    python -m gbjax.train --config gbjax/configs/resnet18_cifar10.py --workdir /tmp/r18gb \
        --set preprocess="'gb'" --set gb="{'threshold': 20.0, 'purity': 0.9}"

Recipe: SGD with Nesterov momentum 0.9, batch 512, one-cycle learning rate
(linear warm-up to 0.4 over 25% of the steps, then linear to 0), weight decay
5e-4 on kernels, label smoothing 0.1, random crop (pad 4) + horizontal flip on
device, bfloat16 compute, 30 epochs.

Expected: >= 93% clean test accuracy (target; NOT yet measured -- needs a GPU).
Runtime: an estimated few minutes on one H100 (not measured); impractical on
CPU: ResNet-18 trained at 6.8 img/s on the 2-core development machine
(float32, batch 128, ``benchmarks/train_throughput.py``), about 61 h for 30
epochs.
"""

from gbjax.config import Config


def get_config(arg: str | None = None) -> Config:
    config = Config(
        dataset="cifar10",
        model="resnet18",
        compute_dtype="bfloat16",
        augment="crop_flip",
        crop_pad=4,
        optimizer="sgd",
        learning_rate=0.4,
        schedule="onecycle",
        warmup_fraction=0.25,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        label_smoothing=0.1,
        batch_size=512,
        eval_batch_size=1000,
        num_epochs=30,
        log_every_steps=50,
        checkpoint_every_steps=500,
    )
    if arg == "resnet20":
        config.model = "resnet20"
    elif arg == "smoke":
        config.model, config.compute_dtype = "resnet20", "float32"
        config.num_train, config.num_test = 512, 500
        config.batch_size, config.eval_batch_size = 64, 250
        config.num_steps, config.log_every_steps = 8, 4
    elif arg:
        raise ValueError(f"unknown config arg {arg!r}")
    return config
