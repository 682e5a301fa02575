"""CIFAR-10, ResNet34 teacher -> Spiking ResNet18, T=4.

Command:
  python -m idsnn_jax.main --config=configs/cifar10.py --workdir=runs/cifar10_t4
Paper: 94.03 (T=4), 94.22 (T=6); teacher 95.10.
Data: TFDS `cifar10`, or the official archive in --config.data_dir.
"""

from idsnn_jax.configs import default


def get_config():
    config = default.get_config()
    config.dataset = "cifar10"
    return config
