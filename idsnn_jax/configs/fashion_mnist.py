"""Fashion-MNIST: the whole IDSNN pipeline on real data on a 2-core CPU (the embedded default).

Command:
  python -m idsnn_jax.main --config=configs/fashion_mnist.py --workdir=runs/fmnist
Narrow ResNet34 teacher -> narrow Spiking ResNet18 (T=4) on a 10k-image training subset,
plus a baseline SNN (no init, no KD) trained with the same budget for contrast.
Data: Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist) or TFDS.
Measured (`bash run.sh demo`, 2-core CPU, seed 0, full test set, 2026-11-26): teacher 79.02,
student (init + KD) 76.56, baseline SNN 75.48; about 14 minutes in all. The paper's
ablation and convergence study at this scale, 3 seeds, with a stronger teacher:
experiments/results/fashion_mnist/ (experiments/paper_study.py).
"""

from idsnn_jax.configs import default


def get_config():
    config = default.get_config()
    config.dataset = "fashion_mnist"
    config.max_train_examples = None  # the teacher: all 60,000 training images
    config.teacher.width = 0.125
    config.teacher.num_epochs = 1
    config.student.max_train_examples = 10000  # the students (and the baseline): the first 10,000
    config.student.width = 0.125
    config.student.num_epochs = 2
    config.optimizer.schedule = "cosine"  # to 0 at each stage's last step
    config.augment.flip = False
    config.compare_baseline = True
    return config
