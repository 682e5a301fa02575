"""CIFAR-100, ResNet34 teacher -> Spiking ResNet18, T=4 (the reference recipe).

Command:
  python -m idsnn_jax.main --config=configs/cifar100.py --workdir=runs/cifar100_t4
  (T=6: add --config.student.time_steps=6)
Paper: 75.24 (T=4), 75.41 (T=6); teacher 77.26. Ablation (T=6): baseline 71.34
(--config.init_from_teacher=False --config.distill=False), init only 74.47
(--config.distill=False), KD only 73.71 (--config.init_from_teacher=False).
Data: TFDS `cifar100`, or the official archive in --config.data_dir.
"""

from idsnn_jax.configs import default


def get_config():
    config = default.get_config()
    config.dataset = "cifar100"
    return config
