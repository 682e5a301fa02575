"""Tiny settings for tests, the notebook's quick path and CI: the whole pipeline in seconds.

Command:
  python -m idsnn_jax.main --config=configs/tiny.py --workdir=runs/tiny
Real Fashion-MNIST (64 train / 32 test images), a width-1/16 ResNet18 teacher (compiles
faster than a ResNet34; the mapping is the same) and a width-1/16 Spiking ResNet18 at T=2,
one epoch each. Accuracy means nothing here; it checks that everything runs.
"""

from idsnn_jax.configs import fashion_mnist


def get_config():
    config = fashion_mnist.get_config()
    config.max_train_examples = 64
    config.student.max_train_examples = None  # the global 64, as the teacher's
    # The step schedule tiny runs had before the default turned cosine (a run may grow).
    config.optimizer.schedule = "step"
    config.optimizer.lr_milestones = (2,)
    config.max_test_examples = 32
    config.batch_size = 16
    config.eval_batch_size = 16
    config.teacher.model = "resnet18"
    config.teacher.width = 0.0625
    config.teacher.num_epochs = 1
    config.student.width = 0.0625
    config.student.time_steps = 2
    config.student.num_epochs = 1
    config.compare_baseline = False
    config.log_every_steps = 2
    return config
