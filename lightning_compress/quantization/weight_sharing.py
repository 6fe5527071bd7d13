"""WeightSharing: k-means trained quantization of weights (Deep Compression), with real Huffman-coded sizes.

The clustering, the Huffman coding and the storage accounting are plain torch, in
:mod:`lightning_compress.quantization.weight_sharing_core` (re-exported here); this module schedules them during a fit.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_compress import _checks
from lightning_compress._events import record_event
from lightning_compress.callback import SHARE_VALUES, CompressionCallback, compression_callbacks
from lightning_compress.quantization import weight_sharing_core as core
from lightning_compress.quantization.weight_sharing_core import (
    INITS,
    LayerStorage,
    SharedWeights,
    WeightSharingConfig,
    huffman_code_lengths,
    huffman_decode,
    huffman_encode,
    init_centroids,
    kmeans_1d,
    layer_storage,
    relative_positions,
    share_weights,
    share_weights_,
    shared_tensor,
)
from lightning_compress.schedules import Point, validate_point
from lightning_compress.selection import Selector
from lightning_compress.stats import TensorFormat

__all__ = [
    "INITS",
    "LayerStorage",
    "SharedWeights",
    "WeightSharing",
    "WeightSharingConfig",
    "huffman_code_lengths",
    "huffman_decode",
    "huffman_encode",
    "init_centroids",
    "kmeans_1d",
    "layer_storage",
    "relative_positions",
    "share_weights",
    "share_weights_",
    "shared_tensor",
]


class WeightSharing(CompressionCallback):
    """Trained quantization by weight sharing (Gong et al. 2014; Han et al. 2016, "Deep Compression").

    At ``start`` the non-zero weights of every selected layer are clustered into ``2**bits`` shared values
    with 1-D k-means (:func:`share_weights_` on the model); pruned zeros stay out of the clusters and stay
    zero. From then on the shared values are fine-tuned: the gradient of each shared value is the sum of the
    gradients of its members (every member receives that sum, and the optimizer state of the members is
    merged at clustering time, so all members take the same step), and after every optimizer step each
    weight is set back exactly to its cluster's value. The weights always hold the shared values, so
    validation measures the weight-shared model and checkpoints load into the plain model.

    Storage (:meth:`storage_report`): per layer the indices at ``bits`` bits plus the fp32 codebook plus, for
    a pruned layer, Deep Compression's relative positions at ``index_bits`` bits; and the same streams
    Huffman-coded (the size of the actual bit streams). Run it after pruning (e.g. ``GradualPruning`` ending
    before ``start``). :meth:`storage_formats` lets ``CompressionMonitor`` count the layers at ``bits`` bits
    plus their codebook.

    Logged: ``weight_sharing/compression_ratio`` (dense fp32 bytes of the model / bytes with Huffman coding),
    ``weight_sharing/size_bytes``, ``weight_sharing/quantization_error`` (relative L2 change of the weights
    at clustering).

    Args:
        bits: bits per shared-value index (``2**bits`` clusters), 1 to 16.
        start: when the weights are clustered (fraction of training, ``"step:N"`` or ``"epoch:N"``); ``None``: at
            the first step, or, with ``GradualPruning`` in the same fit, at the step its amount is reached (prune,
            then share); an earlier one is refused at setup.
        modules: layers to share (types and/or name patterns).
        exclude: layers to leave alone.
        min_params: leave out layers with fewer parameters.
        init: centroid initialization: ``"linear"``, ``"density"`` or ``"random"``.
        index_bits: bits per relative position in the sparse storage layout, 1 to 16.
        iterations: maximum k-means iterations.
        seed: seed of ``init="random"``.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> sharing = WeightSharing(bits=5, start=0.5, modules=[nn.Linear])
        >>> trainer = Trainer(callbacks=[sharing], max_epochs=4, logger=False)
        >>> WeightSharing(bits=0)
        Traceback (most recent call last):
        ...
        ValueError: `bits=0` is out of range: weight sharing supports 1 to 16 bits (2 to 65,536 shared values).
    """

    prefix = "weight_sharing/"
    effect_order = SHARE_VALUES
    selects_layers = True

    def __init__(
        self,
        bits: int = 5,
        start: Point | None = None,
        modules: Selector = (nn.Conv2d, nn.Linear),
        exclude: Selector = None,
        min_params: int = 0,
        init: str = "linear",
        index_bits: int = 5,
        iterations: int = 50,
        seed: int = 0,
    ) -> None:
        self.config = WeightSharingConfig(
            bits=bits,
            modules=modules,
            exclude=exclude,
            min_params=min_params,
            init=init,
            index_bits=index_bits,
            iterations=iterations,
            seed=seed,
        )
        self.start = None if start is None else validate_point(start, "start")
        self.bits, self.selection, self.init = bits, self.config.selection, init
        self.index_bits, self.iterations, self.seed = index_bits, iterations, seed
        self.shared = SharedWeights(bits)
        self._start_step = 0
        self._params: dict[str, nn.Parameter] = {}

    def state_key_fields(self) -> dict[str, Any]:
        return {"bits": self.bits, "modules": str(self.selection)}

    @property
    def clustered(self) -> bool:
        """Whether the weights have been clustered."""
        return bool(self.shared.codebooks)

    @property
    def codebooks(self) -> dict[str, Tensor]:
        """The shared values of each weight, by parameter name (empty before clustering)."""
        return self.shared.codebooks

    @property
    def indices(self) -> dict[str, Tensor]:
        """The codebook index of every entry of each weight (0 where pruned)."""
        return self.shared.indices

    @property
    def kept(self) -> dict[str, Tensor]:
        """The clustered (non-zero) entries of each weight."""
        return self.shared.kept

    @property
    def quantization_error(self) -> float | None:
        """Relative L2 change of the weights at clustering (``None`` before)."""
        return self.shared.quantization_error

    # -- lifecycle -----------------------------------------------------------------------------------

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._params = core.weight_parameters(pl_module, self.selection)
        # Pruning in the same fit (set up before, in effect order) must be done before the values are shared:
        # a weight pruned after clustering would be set back to its shared value after every step.
        ramps = [c.ramp_end for c in compression_callbacks(trainer) if c.ramp_end is not None]
        pruned = max(ramps, default=None)
        if self.start is None:
            self._start_step = pruned if pruned is not None else 0
            return
        self._start_step = self.step_of(trainer, self.start, "start")
        _checks.check_start_within_fit(
            self.start,
            self._start_step,
            trainer.estimated_stepping_batches,
            "the weights would never be shared",
        )
        if pruned is not None and self._start_step < pruned:
            raise ValueError(
                f"`start={self.start!r}` clusters the weights at step {self._start_step}, before GradualPruning "
                f"reaches its amount at step {pruned}: the weights it prunes after would be set back to their "
                f"shared values, and the sparsity would stay below `amount`. Leave `start` unset (it then starts "
                f"at step {pruned}) or give `start='step:{pruned}'` or later."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.remove_hooks()
        self.on_optimizer_step(trainer, self._snap, params=self._params.values())
        self._snap()  # resumed after clustering: keep the loaded weights exactly on their shared values

    def _snap(self) -> None:
        if self.clustered:
            self.shared.snap_(self._params)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.clustered and trainer.global_step >= self._start_step:
            self._cluster(trainer)

    def _cluster(self, trainer: pl.Trainer) -> None:
        shared = core.cluster_weights(self._params, self.config)
        # Every rank must hold the same clusters; rank zero decides (the weights are equal under DDP anyway).
        self.shared = trainer.strategy.broadcast(shared, src=0)
        for optimizer in trainer.optimizers:
            self.shared.merge_optimizer_state_(optimizer, self._params)
        self.shared.snap_(self._params)
        record_event(trainer, self, f"weights clustered into {2**self.bits} shared values")
        rank_zero_info(
            f"WeightSharing clustered {len(self._params)} weights into {2**self.bits} shared values each "
            f"(relative change {self.quantization_error:.3g})."
        )

    def unfinished(self, trainer: pl.Trainer) -> tuple[str, int, str] | None:
        if not self.clustered:
            return "start", self._start_step, "no weight was clustered"
        return None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.clustered:
            self.shared.sum_gradients_(self._params)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.quantization_error is not None:
            self.log_values(pl_module, {"quantization_error": self.quantization_error})

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.clustered:
            return
        report = self.storage_report(pl_module)
        values = {
            "compression_ratio": report["ratios"]["huffman"],
            "size_bytes": report["total"]["huffman_bytes"],
        }
        self.log_values(pl_module, values, epoch=True)

    # -- reporting -----------------------------------------------------------------------------------

    def storage_formats(self, pl_module: pl.LightningModule) -> dict[str, TensorFormat]:
        """Shared weights at ``bits`` bits plus their ``2**bits``-entry fp32 codebook."""
        return self.shared.storage_formats()

    def storage_report(self, pl_module: nn.Module) -> dict[str, Any]:
        """Bytes of the whole model at each Deep Compression stage, per layer and in total, and the ratios.

        Every parameter and buffer that is not a shared weight counts as fp32 (or its dtype), dense; a tensor
        held under several names (tied weights) counts once.
        """
        return core.storage_report(
            pl_module, list(self._params), self.shared if self.clustered else None, self.index_bits
        )

    # -- checkpoints ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "codebooks": self.codebooks,
            "indices": self.indices,
            "kept": self.kept,
            "quantization_error": self.quantization_error,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("bits", self.bits) != self.bits:
            raise ValueError(
                f"The checkpoint was written by WeightSharing(bits={state_dict['bits']}); this callback has bits={self.bits}."
            )
        self.shared = SharedWeights(
            self.bits,
            dict(state_dict["codebooks"]),
            dict(state_dict["indices"]),
            dict(state_dict["kept"]),
            state_dict.get("quantization_error"),
        )
