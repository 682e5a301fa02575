"""The reference IDSNN recipe (ResNet34 teacher -> Spiking ResNet18, CIFAR-100, T=4).

Command:
  python -m idsnn_jax.main --config=configs/default.py --workdir=runs/cifar100_t4
Expected: student top-1 about 75.2 (paper, T=4; teacher 77.26). 200 + 200 epochs at
global batch 64: about a day on one modern GPU. Every value here is the reference's;
variants (cifar10.py, cifar100.py, fashion_mnist.py) import this and override a few.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    _data(config)
    config.teacher = _teacher()
    config.student = _student()
    _method(config)
    config.optimizer = _optimizer()
    config.augment = _augment()
    _run(config)
    return config


def _data(config: ml_collections.ConfigDict) -> None:
    """The data, its batches and the compute dtype."""
    config.dataset = "cifar100"
    config.data_dir = ml_collections.config_dict.placeholder(str)  # None: default places, then TFDS
    config.seed = 0
    config.batch_size = 64  # global, over all devices
    config.eval_batch_size = 512  # divides evenly over 1, 2, 4, 8, ... devices
    # The training split is cut into data_shards contiguous shards, each permuted on its own;
    # every global batch takes batch_size / data_shards examples from each. Of P processes,
    # each loads and holds only its data_shards / P shards. A multiple of P dividing
    # batch_size; 0: one shard per process (config.json records the count used). A run on P
    # processes equals one on 1 process with data_shards=P (README "Many processes, many
    # hosts"); 1 is the order of runs before shards existed.
    config.data_shards = 0
    # None: all. teacher.max_train_examples and student.max_train_examples override it per stage.
    config.max_train_examples = ml_collections.config_dict.placeholder(int)
    config.max_test_examples = ml_collections.config_dict.placeholder(int)
    # Compute dtype: "auto" is bfloat16 on GPU/TPU and float32 on CPU; parameters, BatchNorm
    # statistics and membrane potentials stay float32. "float32" everywhere is the reference.
    config.dtype = "auto"


def _teacher() -> ml_collections.ConfigDict:
    teacher = ml_collections.ConfigDict()
    teacher.model = "resnet34"
    teacher.width = 1.0
    teacher.num_epochs = 200
    teacher.checkpoint = ""  # a trained teacher to reuse instead of stage 1
    # Each stage's training budget: the first that many training examples. None: the global
    # max_train_examples. So a teacher may see all the data while the students see a subset
    # (the baseline is a student stage: it has the students' budget).
    teacher.max_train_examples = ml_collections.config_dict.placeholder(int)
    return teacher


def _student() -> ml_collections.ConfigDict:
    student = ml_collections.ConfigDict()
    student.model = "spiking_resnet18"
    student.width = 1.0
    student.time_steps = 4
    student.num_epochs = 200
    student.max_train_examples = ml_collections.config_dict.placeholder(int)
    student.stem_padding = 1  # 3 reproduces the reference SNN stem (36x36 maps)
    # Memory-saving BPTT, exact gradients (README "Training memory"): recompute each block in
    # the backward pass; keep what the backward needs of spikes as bits, not float32.
    student.remat = False
    student.pack_spikes = False
    # The student's gradient: "bptt" (exact, the reference) or "sltt" (online: no gradient
    # along time, memory about flat in T; README "Training memory");
    # sltt_k: the time steps drawn per batch for SLTT's backward (None: all T).
    student.gradient = "bptt"
    student.sltt_k = ml_collections.config_dict.placeholder(int)
    student.neuron = ml_collections.ConfigDict()
    student.neuron.decay = 0.25
    student.neuron.v_th = 0.5
    student.neuron.surrogate = "rect"
    student.neuron.surrogate_width = 0.5
    return student


def _method(config: ml_collections.ConfigDict) -> None:
    """IDSNN's switches: initialization from the teacher and distillation, and the losses."""
    config.init_from_teacher = True
    config.block_map = "first"
    config.copy_shortcut = False
    config.distill = True
    config.kd_alpha = 0.3
    config.kd_tau = 4.0
    # Beyond the reference (each off here; configs/cifar100_modern.py turns them on): label
    # smoothing of every CE term; TET, the CE of every time step's logits, blended with the
    # time-mean CE by tet_weight (1: TET alone); KD of every step's logits (kd_per_step); an
    # exponential moving average of the weights, evaluated beside them (ema_decay > 0).
    config.label_smoothing = 0.0
    config.tet_weight = 0.0
    config.kd_per_step = False
    config.ema_decay = 0.0
    config.compare_baseline = False  # also train an SNN without init and KD, for contrast


def _optimizer() -> ml_collections.ConfigDict:
    optimizer = ml_collections.ConfigDict()
    optimizer.learning_rate = 0.05
    optimizer.momentum = 0.9
    optimizer.weight_decay = 1e-4
    optimizer.lr_milestones = (60, 120, 160)
    optimizer.lr_interval = 0  # > 0: step every lr_interval epochs instead
    optimizer.lr_gamma = 0.1
    optimizer.schedule = "step"  # "cosine": to 0 at the last step, milestones unused
    optimizer.warmup_epochs = 0  # linear warm-up before either schedule
    return optimizer


def _augment() -> ml_collections.ConfigDict:
    augment = ml_collections.ConfigDict()
    augment.crop_padding = 4
    augment.flip = True
    augment.cutout = 0  # side of the square zeroed after normalization (pixels; 0: off)
    augment.auto_augment = False  # one random op of augment_ops.OPS per example
    return augment


def _run(config: ml_collections.ConfigDict) -> None:
    """Checkpoints, logging, dispatch and what evaluation counts."""
    config.checkpoint_keep = 2  # newest saved epochs kept in <workdir>/<stage> (+ the best)
    config.checkpoint_every_epochs = 1  # the last epoch and the best one are always saved
    config.log_every_steps = 50
    # Train steps per host dispatch (a scan over k steps); results do not depend on it. Keep 1
    # on CPU: XLA:CPU runs a step inside a loop ~20x slower. On GPU/TPU k > 1 saves host
    # dispatch for small models (not yet measured here).
    config.steps_per_call = 1
    # Evaluation counts SOPs and MACs per image and layer and estimates the energy with these
    # per-operation costs (energy.PRESETS: 45nm_fp32, 45nm_fp16, 45nm_int8); "": no counts.
    config.energy = "45nm_fp32"
