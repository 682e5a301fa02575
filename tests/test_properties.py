"""Property tests (hypothesis): the init rule over random model pairs, config validation over
random bad values.

`init_snn_from_ann` is checked between random pairs of registered models (ANN -> SNN, SNN -> ANN,
ANN -> ANN, SNN -> SNN; deeper <-> shallower; basic <-> bottleneck blocks) at random small widths
(wider -> narrower and narrower -> wider), block maps, shortcut/head options and target dtypes,
on real random arrays: every target leaf keeps its shape and dtype, is either the cyclic rule
of its source leaf (computed here, `references.cyclic`) or bit-identical to the
target's own value, and the report names every leaf once, with its source. The expected source
of every leaf (stem, block map, shortcut, head) is written out here from the method's rule, with
hard-coded stage depths, sharing nothing with `resnet_paths`.

`plan.build_plan` is checked over random invalid values of every validated key: it raises a
ValueError naming `config.<key>=` (or the ConfigDict refuses the value's type on assignment).
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from references import cyclic

from idsnn_jax.configs import tiny
from idsnn_jax.models import MODELS, create_model
from idsnn_jax.neuron import SURROGATES
from idsnn_jax.optim import SCHEDULES
from idsnn_jax.plan import build_plan
from idsnn_jax.transfer import init_snn_from_ann, transfer_report

# Blocks per stage of the CIFAR ResNets, written out, not read from the package.
DEPTHS = {
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet152": (3, 8, 36, 3),
    "spiking_resnet18": (2, 2, 2, 2),
    "spiking_resnet34": (3, 4, 6, 3),
    "sew_resnet18": (2, 2, 2, 2),
    "sew_resnet34": (3, 4, 6, 3),
}
WIDTHS = (0.03, 0.05, 0.0625, 0.1)


def test_every_registered_model_is_drawn():
    assert set(DEPTHS) == set(MODELS)


@functools.cache
def _shapes(name: str, width: float) -> dict[str, jax.ShapeDtypeStruct]:
    """{path: ShapeDtypeStruct} of the model's variables ('params/stem/conv/kernel', ...)."""
    kwargs = {"time_steps": 2} if not name.startswith("resnet") else {}
    model = create_model(name, num_classes=10, width=width, **kwargs)
    init = functools.partial(model.init, train=False)
    return _flat(jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 8, 8, 3))))


def _flat(tree, prefix: str = "") -> dict:
    out = {}
    for key in sorted(tree):  # JAX's leaf order for dicts: sorted keys
        value = tree[key]
        if hasattr(value, "keys"):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = value
    return out


def _nest(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return out


def _random_tree(name: str, width: float, seed: int, dtype) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        path: rng.standard_normal(s.shape).astype(np.float32).astype(dtype)
        for path, s in _shapes(name, width).items()
    }


BOTTLENECKS = {"resnet50", "resnet101", "resnet152"}


def _expected_source(path: str, case: dict, src_paths) -> str | None:
    """The init rule: the source path of a target leaf, or None when it keeps its own value."""
    coll, top, *rest = path.split("/")
    if top == "stem":
        return path
    if top == "head":
        return path if case["copy_head"] else None
    s, j = int(top.removeprefix("stage")), int(rest[0].removeprefix("block"))
    d, n = DEPTHS[case["src"]][s - 1], DEPTHS[case["dst"]][s - 1]
    if case["block_map"] == "first":
        i = min(j, d - 1)
    else:  # "uniform": round(j * (d - 1) / (n - 1)), halves up
        i = 0 if n == 1 else math.floor(Fraction(j * (d - 1), n - 1) + Fraction(1, 2))
    module = rest[1]
    if case["src"] in BOTTLENECKS and case["dst"] not in BOTTLENECKS:
        # A bottleneck's one 3x3 conv (conv2/bn2) feeds a basic block's conv1/bn1; basic
        # conv2/bn2 have no counterpart and keep their values.
        module = {"conv1": "conv2", "bn1": "bn2", "conv2": None, "bn2": None}.get(module, module)
        if module is None:
            return None
    source = "/".join([coll, top, f"block{i}", module, *rest[2:]])
    if rest[1].startswith("shortcut"):
        return source if case["copy_shortcut"] and source in src_paths else None
    return source


def _cyclic_axes(path: str, src_shape, dst_shape) -> tuple[int, ...] | None:
    """Axes the rule maps cyclically, or None when the shapes cannot be mapped: kernels map
    their two channel axes (HWIO) and need equal spatial axes, BN vectors their only axis;
    the head maps its input axis and needs the same classes."""
    if len(src_shape) != len(dst_shape):
        return None
    ndim = len(dst_shape)
    axes = tuple(range(ndim - 1)) if path.split("/")[1] == "head" else tuple(range(ndim))[-2:]
    fixed = [a for a in range(ndim) if a not in axes]
    return axes if all(src_shape[a] == dst_shape[a] for a in fixed) else None


transfer_cases = st.fixed_dictionaries(
    {
        "src": st.sampled_from(sorted(DEPTHS)),
        "dst": st.sampled_from(sorted(DEPTHS)),
        "src_width": st.sampled_from(WIDTHS),
        "dst_width": st.sampled_from(WIDTHS),
        "block_map": st.sampled_from(["first", "uniform"]),
        "copy_shortcut": st.booleans(),
        "copy_head": st.booleans(),
        "dst_dtype": st.sampled_from([np.float32, jnp.bfloat16]),
        "seed": st.integers(0, 2**16),
    }
)


@pytest.mark.slow
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=transfer_cases)
def test_init_snn_from_ann_is_the_cyclic_rule_for_any_pair(case):
    src = _random_tree(case["src"], case["src_width"], case["seed"], np.float32)
    dst = _random_tree(case["dst"], case["dst_width"], case["seed"] + 1, case["dst_dtype"])
    options = {k: case[k] for k in ("block_map", "copy_shortcut", "copy_head")}
    out, report = init_snn_from_ann(
        _nest(src), _nest(dst), strict=False, return_report=True, **options
    )
    out = _flat(out)
    assert list(out) == list(dst)
    assert [e.target for e in report.entries] == list(dst)  # every leaf, once, in order
    unmappable = []
    for path, target in dst.items():
        got = np.asarray(out[path])
        assert got.shape == target.shape and got.dtype == target.dtype, path
        source = _expected_source(path, case, src)
        axes = None if source not in src else _cyclic_axes(path, src[source].shape, target.shape)
        entry = report.entries[list(dst).index(path)]
        if axes is None:  # kept: the target's own value, bit for bit
            if source is not None:
                unmappable.append(path)
            assert (entry.action, entry.source) == ("kept", None), (path, entry)
            assert got.tobytes() == target.tobytes(), path
        else:
            assert (entry.action, entry.source) == ("copied", source), (path, entry)
            want = cyclic(src[source], target.shape, axes).astype(target.dtype)
            assert got.tobytes() == want.tobytes(), path
    # strict (the default) raises exactly when a leaf the rule selects cannot be mapped.
    abstract = [_nest(dict(_shapes(case[k], case[f"{k}_width"]))) for k in ("src", "dst")]
    if unmappable:
        with pytest.raises(ValueError, match="cannot be mapped"):
            transfer_report(*abstract, **options)
    else:
        transfer_report(*abstract, **options)


# --- Config validation ------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
_neg_ints = st.integers(max_value=0)
_not_positive = st.floats(max_value=0.0) | st.just(NAN) | st.just(-INF)
_negative = st.floats(max_value=0.0, exclude_max=True) | st.just(NAN) | st.just(-INF)
_names = st.text(max_size=12)
_not_multiple_of_4 = st.integers(min_value=1, max_value=2**40).filter(lambda v: v % 4)

# key -> invalid values (tiny config on 4 devices). None is accepted by ConfigDict anywhere.
BAD_VALUES = {
    "dataset": _names.filter(lambda v: v not in ("cifar10", "cifar100", "fashion_mnist")),
    "batch_size": _neg_ints | _not_multiple_of_4 | st.none(),
    "eval_batch_size": _neg_ints | _not_multiple_of_4 | st.none(),
    "max_train_examples": st.integers(max_value=15),  # fewer than one batch of 16
    "max_test_examples": _neg_ints,
    "dtype": _names.filter(lambda v: v not in ("auto", "float32", "bfloat16")),
    "teacher.model": _names.filter(lambda v: v not in MODELS) | st.just("spiking_resnet18"),
    "teacher.width": _not_positive,
    "teacher.num_epochs": _neg_ints | st.none(),
    "teacher.checkpoint": _names.map(lambda v: f"/no/such/teacher/{v}"),
    "student.model": _names.filter(lambda v: v not in MODELS) | st.just("resnet34"),
    "student.width": _not_positive,
    "student.time_steps": _neg_ints | st.none(),
    "student.num_epochs": _neg_ints | st.none(),
    "student.stem_padding": st.integers(max_value=-1) | st.none(),
    "student.neuron.decay": st.floats(min_value=1.0, exclude_min=True) | _negative,
    "student.neuron.v_th": _not_positive,
    "student.neuron.surrogate": _names.filter(lambda v: v not in SURROGATES),
    "student.neuron.surrogate_width": _not_positive,
    "block_map": _names.filter(lambda v: v not in ("first", "uniform")),
    "kd_alpha": _negative,
    "kd_tau": _not_positive,
    "optimizer.learning_rate": _not_positive,
    "optimizer.momentum": st.floats(min_value=1.0) | _negative,
    "optimizer.weight_decay": _negative,
    "optimizer.lr_milestones": st.lists(st.integers(), min_size=1, max_size=4)
    .filter(lambda v: min(v) <= 0 or v != sorted(v))
    .map(tuple),
    "optimizer.lr_interval": st.integers(max_value=-1) | st.none(),
    "optimizer.lr_gamma": st.floats(min_value=1.0, exclude_min=True) | _not_positive,
    "augment.crop_padding": st.integers(max_value=-1) | st.none(),
    "augment.cutout": st.integers(max_value=-1) | st.none(),
    "optimizer.schedule": _names.filter(lambda v: v not in SCHEDULES),
    "optimizer.warmup_epochs": st.integers(max_value=-1) | st.none(),
    "label_smoothing": st.floats(min_value=1.0) | _negative,
    "tet_weight": st.floats(min_value=1.0, exclude_min=True) | _negative,
    "ema_decay": st.floats(min_value=1.0) | _negative,
    "checkpoint_keep": _neg_ints | st.none(),
    "checkpoint_every_epochs": _neg_ints | st.none(),
    "log_every_steps": _neg_ints | st.none(),
}


def _tiny_cifar10():
    config = tiny.get_config()
    config.dataset = "cifar10"  # no data is read: build_plan needs none
    config.data_dir = "/no/data/needed"
    return config


def _set(config, dotted_key: str, value) -> None:
    *parents, leaf = dotted_key.split(".")
    for name in parents:
        config = config[name]
    config[leaf] = value


@st.composite
def bad_settings(draw):
    key = draw(st.sampled_from(sorted(BAD_VALUES)))
    return key, draw(BAD_VALUES[key])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setting=bad_settings())
def test_build_plan_names_the_key_of_any_bad_value(setting):
    key, value = setting
    config = _tiny_cifar10()
    try:
        _set(config, key, value)
    except TypeError:  # ml_collections refuses a value of another type on assignment
        assume(False)
    with pytest.raises(ValueError) as err:
        build_plan(config)
    assert f"config.{key}=" in str(err.value), (key, value, str(err.value))


# Found by the property above, to be fixed in plan.py (it is not this file's to fix): ConfigDict
# accepts None for every field (`config.student.width = None`), and the builders' `x > 0`
# checks then raise TypeError; an infinite rate passes `> 0`. Strict: each case passes once
# fixed, and then its mark must go and the value join BAD_VALUES.
GAPS = [
    (key, None)
    for key in (
        "teacher.width",
        "student.width",
        "student.model",
        "student.neuron.v_th",
        "student.neuron.decay",
        "kd_alpha",
        "kd_tau",
        "optimizer.learning_rate",
        "optimizer.momentum",
        "optimizer.lr_milestones",
        "seed",
    )
] + [("optimizer.learning_rate", INF), ("kd_tau", INF)]


@pytest.mark.parametrize("key, value", GAPS)
def test_build_plan_names_the_key_of_none_and_inf(key, value):
    config = _tiny_cifar10()
    _set(config, key, value)
    with pytest.raises(ValueError, match=f"config.{key}="):
        build_plan(config)
