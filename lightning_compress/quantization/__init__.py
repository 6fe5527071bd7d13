"""Quantization: int8 / low-bit quantization-aware training (torchao), k-means weight sharing, binary/ternary weights."""

from lightning_compress.quantization.binary import BinaryWeights, binarize, ternarize
from lightning_compress.quantization.binary_core import (
    BinaryConfig,
    binarize_,
    load_binary_checkpoint,
    make_permanent_,
)
from lightning_compress.quantization.low_bit import degradation_recovered, quantize_low_bit
from lightning_compress.quantization.pt2e import (
    QuantizedGraphModule,
    compile_for_cpu,
    convert_int8,
    load_quantized,
    prepare_int8_qat,
    quantize_int8_ptq,
    save_quantized,
)
from lightning_compress.quantization.qat import QuantizationAwareTraining, load_qat_checkpoint
from lightning_compress.quantization.qat_core import QuantizationConfig, convert_qat, prepare_qat
from lightning_compress.quantization.weight_sharing import (
    WeightSharing,
    huffman_encode,
    kmeans_1d,
    layer_storage,
    share_weights,
)
from lightning_compress.quantization.weight_sharing_core import (
    SharedWeights,
    WeightSharingConfig,
    share_weights_,
)

__all__ = [
    "BinaryConfig",
    "BinaryWeights",
    "QuantizationAwareTraining",
    "QuantizationConfig",
    "QuantizedGraphModule",
    "SharedWeights",
    "WeightSharing",
    "WeightSharingConfig",
    "binarize",
    "binarize_",
    "compile_for_cpu",
    "convert_int8",
    "convert_qat",
    "degradation_recovered",
    "huffman_encode",
    "kmeans_1d",
    "layer_storage",
    "load_binary_checkpoint",
    "load_qat_checkpoint",
    "load_quantized",
    "make_permanent_",
    "prepare_int8_qat",
    "prepare_qat",
    "quantize_int8_ptq",
    "quantize_low_bit",
    "save_quantized",
    "share_weights",
    "share_weights_",
    "ternarize",
]
