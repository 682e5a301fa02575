"""Fashion-MNIST: the whole IDSNN pipeline on real data on a 2-core CPU (the embedded default).

Command (what `bash run.sh demo` runs):
  python -m idsnn_jax.main --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist
A narrow ResNet34 teacher (width 1/8) trained 1 epoch on all 60,000 training images, then a
narrow Spiking ResNet18 (width 1/8, T=4) initialized from it and distilled, 2 epochs on the
first 10,000 images, plus a baseline SNN (no init, no KD) with the students' budget, for
contrast. Cosine learning rate (to 0 at each stage's last step). The teacher sees all the
data so that it is clearly stronger than the students, as in the paper; the students' short
budget is where the method shows: a student started from the teacher is ahead at once.
Expected (seeds 0, 1, 2; experiments/results/fashion_mnist/demo.md): teacher 84.69 +- 1.43,
student (init + KD) 76.28 +- 0.86, baseline 70.51 +- 1.39: IDSNN - baseline +5.77 +- 0.87,
at least +4.9 in every seed (seed 0: 83.07, 75.97, 70.66 in the run's own baseline stage).
Data: Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist) or TFDS.
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
