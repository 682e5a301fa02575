"""idsnn-jax: IDSNN (ANN-initialized, distilled Spiking ResNets) in JAX/Flax.

Library entry points: `create_model`, `lif_scan`, `kd_loss` / `idsnn_loss`,
`init_snn_from_ann`, `from_torch_state_dict` (a PyTorch teacher's weights in), and
`pipeline.run(config, workdir)` for the whole method.
"""

from idsnn_jax.losses import cross_entropy, idsnn_loss, kd_loss
from idsnn_jax.models import create_model
from idsnn_jax.neuron import lif_scan, spike
from idsnn_jax.torch_import import from_torch_state_dict
from idsnn_jax.transfer import TransferEntry, TransferReport, init_snn_from_ann, transfer_report

__all__ = [
    "TransferEntry",
    "TransferReport",
    "create_model",
    "cross_entropy",
    "from_torch_state_dict",
    "idsnn_loss",
    "init_snn_from_ann",
    "kd_loss",
    "lif_scan",
    "spike",
    "transfer_report",
]
