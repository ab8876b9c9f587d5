#!/usr/bin/env python3
"""Write stand-in ONNX models that the real FaceFusion 3.8.1 takes for its own.

FaceFusion's weights come from GitHub releases and Hugging Face at run time, which the
test machines cannot reach. FaceFusion accepts any ONNX file under its model name whose
``.hash`` file beside it holds the file's CRC32 (``facefusion/hash_helper.py``:
``format(zlib.crc32(content), '08x')``) and which answers the inputs it feeds with outputs
of the shapes it reads. This script writes such files for everything a ``face_swapper``
job checks or runs (FaceFusion's defaults: ``yolo_face`` detector, ``2dfan4`` + ``fan_68_5``
landmarkers, ``arcface_w600k_r50`` recogniser, ``fairface`` classifier, the three
``nsfw_*`` content analysers, the ``xseg_1`` occluder and ``bisenet_resnet_34`` parser that
the face masker checks) and for the swapper models of our API whitelist.

What each stand-in computes (enough for the real pipeline to run end to end):

* ``yoloface_8n``: one face, centred in the picture (found as the non-black extent of the
  letter-boxed input), its side 45% of the shorter side, score 0.9, five landmarks from
  FaceFusion's ``arcface_112_v2`` template scaled into the box; an all-black picture has
  no face (score 0), which is how the tests show a target without a face. Other anchors
  score 0.
* ``fan_68_5``: a fixed frontal 68-point layout (so the face angle is 0).
* ``2dfan4``: zero heatmaps (landmark score 0): FaceFusion keeps the detector's 5 points.
* ``arcface_w600k_r50``: a fixed random projection of the 8x8-pooled crop (512 values):
  different faces give different embeddings.
* swappers: the crop inverted and tinted by a projection of the source (visible, and
  different per source face), in each model type's value range.
* content analysers: zero scores (nothing is flagged); classifier: class 0; occluder: all
  face; parser: all background.

``--real-sizes`` pads each file with a weight tensor that the graph reads (so ONNX Runtime
loads it) to about the size of the real model, for start-up measurements (``make bench``).
Needs ``onnx`` and ``numpy`` (FaceFusion's own venv has both). Idempotent: a model whose
file and ``.hash`` already match what this script writes is left alone.
"""

from __future__ import annotations

import argparse
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# FaceFusion's arcface_112_v2 five-point template (face_helper.py), in 112x112 pixels.
ARCFACE_112_V2 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
FACE_SIDE_FRACTION = 0.45
FACE_ANCHOR = 100  # FaceFusion skips keep index 0 (numpy.any([0]) is False): use another anchor.

# About the size of each real file (bytes, FaceFusion's release assets), for --real-sizes.
REAL_SIZES = {
    "yoloface_8n": 12_300_000,
    "2dfan4": 98_000_000,
    "fan_68_5": 1_000_000,
    "arcface_w600k_r50": 174_000_000,
    "fairface": 85_000_000,
    "nsfw_1": 12_000_000,
    "nsfw_2": 23_000_000,
    "nsfw_3": 350_000_000,
    "xseg_1": 70_000_000,
    "bisenet_resnet_34": 93_000_000,
    "inswapper_128": 554_000_000,
    "inswapper_128_fp16": 277_000_000,
    "hyperswap_1a_256": 400_000_000,
    "hyperswap_1b_256": 400_000_000,
    "hyperswap_1c_256": 400_000_000,
    "simswap_256": 220_000_000,
    "simswap_unofficial_512": 220_000_000,
    "ghost_1_256": 330_000_000,
    "ghost_2_256": 370_000_000,
    "ghost_3_256": 440_000_000,
    "blendswap_256": 190_000_000,
    "uniface_256": 380_000_000,
    "crossface_ghost": 10_000_000,
    "crossface_simswap": 10_000_000,
}

# Swapper model -> (FaceFusion type, crop size, source input shape, embedding converter).
SWAPPERS: dict[str, tuple[str, int, list[int], str | None]] = {
    "inswapper_128": ("inswapper", 128, [1, 512], None),
    "inswapper_128_fp16": ("inswapper", 128, [1, 512], None),
    "hyperswap_1a_256": ("hyperswap", 256, [1, 512], None),
    "hyperswap_1b_256": ("hyperswap", 256, [1, 512], None),
    "hyperswap_1c_256": ("hyperswap", 256, [1, 512], None),
    "simswap_256": ("simswap", 256, [1, 512], "crossface_simswap"),
    "simswap_unofficial_512": ("simswap", 512, [1, 512], "crossface_simswap"),
    "ghost_1_256": ("ghost", 256, [1, 512], "crossface_ghost"),
    "ghost_2_256": ("ghost", 256, [1, 512], "crossface_ghost"),
    "ghost_3_256": ("ghost", 256, [1, 512], "crossface_ghost"),
    "blendswap_256": ("blendswap", 256, [1, 3, 112, 112], None),
    "uniface_256": ("uniface", 256, [1, 3, 256, 256], None),
}

# What a face_swapper job checks besides its swapper (FaceFusion's defaults).
COMMON_MODELS = (
    "yoloface_8n",
    "2dfan4",
    "fan_68_5",
    "arcface_w600k_r50",
    "fairface",
    "nsfw_1",
    "nsfw_2",
    "nsfw_3",
    "xseg_1",
    "bisenet_resnet_34",
)


class Graph:
    """A small graph under construction: nodes, constants, named inputs and outputs."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.output_nodes: list[onnx.NodeProto] = []
        self._count = 0

    def name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def const(self, value: np.ndarray | float | Sequence[int], dtype: type = np.float32) -> str:
        name = self.name("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, **attributes: object) -> str:
        output = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], **attributes))
        return output

    def input(self, name: str, shape: Sequence[int], elem: int = TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        return name

    def output(self, source: str, name: str, shape: Sequence[int], elem: int = TensorProto.FLOAT) -> None:
        self.output_nodes.append(helper.make_node("Identity", [source], [name]))
        self.outputs.append(helper.make_tensor_value_info(name, elem, list(shape)))

    def zero_of(self, tensor: str) -> str:
        """A scalar 0 that depends on ``tensor`` (keeps every input part of the graph)."""
        return self.op("Mul", self.op("ReduceMean", tensor, keepdims=0), self.const(0.0))

    def filled(self, tensor: str, shape: Sequence[int], value: float) -> str:
        """A tensor of ``shape`` holding ``value``, without storing it in the file."""
        scalar = self.op("Add", self.zero_of(tensor), self.const(value))
        return self.op("Expand", scalar, self.const(list(shape), np.int64))

    def model(self, pad_bytes: int, last_initializer: onnx.TensorProto | None = None) -> onnx.ModelProto:
        if pad_bytes > 0:
            # Weights ONNX Runtime must read (a ReduceSum of them, times zero, joins the
            # first output), so loading costs what loading the real model's weights costs.
            pad = self.const(np.full(pad_bytes // 4, 1e-3, dtype=np.float32))
            node = self.output_nodes[0]
            node.input[0] = self.op("Add", node.input[0], self._pad_zero(pad, node.output[0]))
        initializers = list(self.initializers)
        if last_initializer is not None:
            initializers.append(last_initializer)
        nodes = self.nodes + self.output_nodes
        graph = helper.make_graph(nodes, "facefusion_standin", self.inputs, self.outputs, initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        model.producer_name = "comfyswap-facefusion-standin"
        onnx.checker.check_model(model)
        return model

    def _pad_zero(self, pad: str, output_name: str) -> str:
        total = self.op("ReduceSum", pad, keepdims=0)
        zero = self.op("Mul", total, self.const(0.0))
        output = next(value for value in self.outputs if value.name == output_name)
        if output.type.tensor_type.elem_type != TensorProto.FLOAT:
            zero = self.op("Cast", zero, to=output.type.tensor_type.elem_type)
        return zero


def yoloface() -> Graph:
    graph = Graph()
    frame = graph.input("input", [1, 3, 640, 640])
    # Rows and columns with any non-black pixel: the picture, letter-boxed top-left.
    row_max = graph.op("ReduceMax", frame, axes=[1, 3], keepdims=0)  # [1, 640]
    column_max = graph.op("ReduceMax", frame, axes=[1, 2], keepdims=0)  # [1, 640]
    height = graph.op("ReduceSum", graph.op("Cast", graph.op("Greater", row_max, graph.const(0.0)), to=1))
    width = graph.op("ReduceSum", graph.op("Cast", graph.op("Greater", column_max, graph.const(0.0)), to=1))
    shorter = graph.op("Min", height, width)
    side = FACE_SIDE_FRACTION
    width_weights = np.zeros(20, np.float32)
    height_weights = np.zeros(20, np.float32)
    side_weights = np.zeros(20, np.float32)
    constant = np.zeros(20, np.float32)
    width_weights[0], height_weights[1] = 0.5, 0.5
    side_weights[2] = side_weights[3] = side
    score_weights = np.zeros(20, np.float32)
    score_weights[4] = 0.9
    for index, (x, y) in enumerate(ARCFACE_112_V2 / 112.0):
        width_weights[5 + 3 * index] = 0.5
        side_weights[5 + 3 * index] = side * (x - 0.5)
        height_weights[6 + 3 * index] = 0.5
        side_weights[6 + 3 * index] = side * (y - 0.5)
        constant[7 + 3 * index] = 1.0
    face = graph.op(
        "Add",
        graph.op(
            "Add",
            graph.op("Mul", width, graph.const(width_weights)),
            graph.op("Mul", height, graph.const(height_weights)),
        ),
        graph.op("Add", graph.op("Mul", shorter, graph.const(side_weights)), graph.const(constant)),
    )
    # Score 0.9 once the picture is at least 32 px across, 0 for an all-black one.
    present = graph.op(
        "Clip", graph.op("Sub", shorter, graph.const(31.0)), graph.const(0.0), graph.const(1.0)
    )
    face = graph.op("Add", face, graph.op("Mul", present, graph.const(score_weights)))
    face = graph.op("Reshape", face, graph.const([1, 20, 1], np.int64))
    before = graph.filled(frame, [1, 20, FACE_ANCHOR], 0.0)
    after = graph.filled(frame, [1, 20, 8400 - FACE_ANCHOR - 1], 0.0)
    graph.output(graph.op("Concat", before, face, after, axis=2), "output0", [1, 20, 8400])
    return graph


def fan_68_5() -> Graph:
    """68 points of a frontal face in FaceFusion's normalised ffhq_512 frame (0..1)."""
    graph = Graph()
    points = graph.input("input", [1, 5, 2])
    jaw = [(0.2 + 0.6 * i / 16, 0.5 + 0.35 * np.sin(np.pi * i / 16)) for i in range(17)]
    brows = [(0.28 + 0.44 * i / 9, 0.4) for i in range(10)]
    nose = [(0.5, 0.45 + 0.04 * i) for i in range(4)] + [(0.44 + 0.03 * i, 0.62) for i in range(5)]
    eyes = [(0.33 + 0.03 * i, 0.47) for i in range(6)] + [(0.6 + 0.03 * i, 0.47) for i in range(6)]
    mouth = [(0.4 + 0.2 * i / 19, 0.75) for i in range(20)]
    template = np.array(jaw + brows + nose + eyes + mouth, dtype=np.float32).reshape(1, 68, 2)
    graph.output(graph.op("Add", graph.const(template), graph.zero_of(points)), "output", [1, 68, 2])
    return graph


def fan_2dfan4() -> Graph:
    graph = Graph()
    crop = graph.input("input", [1, 3, 256, 256])
    graph.output(graph.filled(crop, [1, 68, 3], 0.0), "landmarks_xyscore", [1, 68, 3])
    graph.output(graph.filled(crop, [1, 68, 64, 64], 0.0), "heatmaps", [1, 68, 64, 64])
    return graph


def arcface() -> Graph:
    graph = Graph()
    crop = graph.input("input", [1, 3, 112, 112])
    pooled = graph.op("AveragePool", crop, kernel_shape=[8, 8], strides=[8, 8])
    flat = graph.op("Flatten", pooled, axis=1)  # [1, 588]
    projection = np.random.default_rng(112).standard_normal((588, 512)).astype(np.float32)
    graph.output(graph.op("MatMul", flat, graph.const(projection)), "683", [1, 512])
    return graph


def fairface() -> Graph:
    graph = Graph()
    crop = graph.input("input", [1, 3, 224, 224])
    for name in ("race_id", "gender_id", "age_id"):
        graph.output(
            graph.op("Cast", graph.filled(crop, [1], 0.0), to=TensorProto.INT64), name, [1], TensorProto.INT64
        )
    return graph


def zero_scores(size: int, output_shape: list[int]) -> Callable[[], Graph]:
    def build() -> Graph:
        graph = Graph()
        frame = graph.input("input", [1, 3, size, size])
        graph.output(graph.filled(frame, output_shape, 0.0), "output", output_shape)
        return graph

    return build


def xseg() -> Graph:
    graph = Graph()
    crop = graph.input("input", [1, 256, 256, 3])
    graph.output(graph.filled(crop, [1, 256, 256, 1], 1.0), "output", [1, 256, 256, 1])
    return graph


def bisenet() -> Graph:
    graph = Graph()
    crop = graph.input("input", [1, 3, 512, 512])
    graph.output(graph.filled(crop, [1, 19, 512, 512], 0.0), "output", [1, 19, 512, 512])
    return graph


def embedding_converter() -> Graph:
    graph = Graph()
    embedding = graph.input("input", [1, 512])
    mixing = np.random.default_rng(512).standard_normal((512, 512)).astype(np.float32) / np.sqrt(512)
    graph.output(graph.op("MatMul", embedding, graph.const(mixing)), "output", [1, 512])
    return graph


def swapper(model_type: str, size: int, source_shape: list[int]) -> tuple[Graph, onnx.TensorProto | None]:
    graph = Graph()
    source = graph.input("source", source_shape)
    target = graph.input("target", [1, 3, size, size])
    rng = np.random.default_rng(size)
    if len(source_shape) == 2:
        tint = graph.op("MatMul", source, graph.const(rng.standard_normal((512, 3)).astype(np.float32) * 0.2))
    else:
        tint = graph.op("ReduceMean", source, axes=[2, 3], keepdims=0)  # [1, 3]: the source's colour
    tint = graph.op("Reshape", graph.op("Tanh", tint), graph.const([1, 3, 1, 1], np.int64))
    # inswapper, simswap and blendswap answer 0..1; the others FaceFusion's -1..1 range.
    unit_range = model_type in ("inswapper", "simswap", "blendswap")
    inverted = graph.op("Sub", graph.const(1.0 if unit_range else 0.0), target)
    swapped = graph.op(
        "Add", graph.op("Mul", inverted, graph.const(0.6)), graph.op("Mul", tint, graph.const(0.4))
    )
    graph.output(swapped, "output", [1, 3, size, size])
    emap = None
    if model_type == "inswapper":
        # FaceFusion reads the source projection ("emap") as the file's last initializer.
        emap = numpy_helper.from_array(np.eye(512, dtype=np.float32), "emap")
    return graph, emap


def builders(swappers: Sequence[str]) -> dict[str, Callable[[], tuple[Graph, onnx.TensorProto | None]]]:
    def plain(build: Callable[[], Graph]) -> Callable[[], tuple[Graph, onnx.TensorProto | None]]:
        return lambda: (build(), None)

    table: dict[str, Callable[[], tuple[Graph, onnx.TensorProto | None]]] = {
        "yoloface_8n": plain(yoloface),
        "2dfan4": plain(fan_2dfan4),
        "fan_68_5": plain(fan_68_5),
        "arcface_w600k_r50": plain(arcface),
        "fairface": plain(fairface),
        "nsfw_1": plain(zero_scores(640, [1, 5, 8400])),
        "nsfw_2": plain(zero_scores(384, [1, 2])),
        "nsfw_3": plain(zero_scores(448, [1, 4])),
        "xseg_1": plain(xseg),
        "bisenet_resnet_34": plain(bisenet),
    }
    for name in swappers:
        model_type, size, source_shape, converter = SWAPPERS[name]
        table[name] = lambda t=model_type, s=size, shape=source_shape: swapper(t, s, shape)
        if converter:
            table[converter] = plain(embedding_converter)
    return table


def crc32_hex(content: bytes) -> str:
    """FaceFusion's hash_helper.create_hash."""
    return format(zlib.crc32(content), "08x")


def write_models(models_dir: Path, swappers: Sequence[str], *, real_sizes: bool) -> list[str]:
    """Write every stand-in (skipping those already in place); the names written."""
    models_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, build in builders(swappers).items():
        graph, last = build()
        pad = max(REAL_SIZES[name] - 2_000_000, 0) if real_sizes else 0
        content = graph.model(pad, last).SerializeToString()
        model_path = models_dir / f"{name}.onnx"
        hash_path = models_dir / f"{name}.hash"
        expected = crc32_hex(content)
        in_place = hash_path.is_file() and model_path.is_file() and hash_path.read_text() == expected
        if in_place and model_path.stat().st_size == len(content):
            continue
        model_path.write_bytes(content)
        hash_path.write_text(expected)
        written.append(name)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "models_dir", type=Path, help="FaceFusion's .assets/models folder (or the /models volume)"
    )
    parser.add_argument("--swappers", nargs="+", default=sorted(SWAPPERS), choices=sorted(SWAPPERS))
    parser.add_argument(
        "--real-sizes", action="store_true", help="pad each file to about the real model's size"
    )
    arguments = parser.parse_args(argv)
    written = write_models(arguments.models_dir, arguments.swappers, real_sizes=arguments.real_sizes)
    print(f"stand-in models in {arguments.models_dir}: {len(written)} written, others already in place")
    return 0


if __name__ == "__main__":
    sys.exit(main())
