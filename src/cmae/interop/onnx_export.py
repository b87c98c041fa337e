"""``cmae export --format onnx``: the encoder as an ONNX graph for serving (onnxruntime,
TensorRT, OpenVINO): input ``images`` [batch, 3, S, S] float, normalised with the mean / std
stored in the model's metadata; output ``features`` [batch, D] (cls or mean pool) or
[batch, L, D] (``tokens``). The batch axis is dynamic. Needs the ``onnx`` extra.

torch's own exporter (``torch.onnx.export``, the torch.export-based one when onnxscript is
installed, else the TorchScript one) writes the graph; a model over 2 GB (ViT-H) keeps its
weights in ``OUT.data`` beside it, as ONNX's protobuf limit requires.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from cmae.config import ConfigError
from cmae.interop.api import Encoder

OPSET = 17  # LayerNormalization is an ONNX op from 17 on: one node, not six
EXTERNAL_BYTES = 1_800_000_000  # weights beyond this go to OUT.data (protobuf's 2 GB limit)


class _Features(nn.Module):
    """``Encoder`` with its pooling fixed: one tensor in, one out, as the graph needs."""

    def __init__(self, encoder: Encoder, pool: str) -> None:
        super().__init__()
        self.encoder, self.pool = encoder, pool

    def forward(self, images: Tensor) -> Tensor:
        return self.encoder(images, self.pool)


def exporter() -> str:
    """ "dynamo" (torch.export, torch's default) when onnxscript is installed, else
    "torchscript" (the older tracer, which needs only onnx)."""
    return "dynamo" if importlib.util.find_spec("onnxscript") else "torchscript"


def export_onnx(
    encoder: Encoder, out: str | Path, pool: str | None = None, how: str | None = None
) -> Path:
    """Write ``encoder`` (eval mode, its image size) to ``out``; ``pool``: "cls", "mean" or
    "tokens" (default the encoder's). ``how``: "dynamo" / "torchscript" (default ``exporter()``).
    The file appears complete or not at all (written in a temporary folder, then moved)."""
    if importlib.util.find_spec("onnx") is None:
        raise ConfigError("--format onnx needs onnx: pip install 'cmae[onnx]'")
    import onnx  # optional extra: only this export needs it

    pool = pool or encoder.pool
    how = how or exporter()
    if how not in ("dynamo", "torchscript"):
        raise ValueError(f"how must be 'dynamo' or 'torchscript', got {how!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = _Features(encoder, pool).eval()
    size = encoder.img_size
    example = torch.zeros(2, 3, size, size)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"cmae export: tracing the {n_params / 1e6:.1f} M-parameter encoder to ONNX ({how}); "
        "a ViT-L takes about a minute on a CPU",
        flush=True,
    )
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        with warnings.catch_warnings():  # the tracer's notes on timm's shape asserts
            warnings.simplefilter("ignore")
            if how == "dynamo":
                torch.onnx.export(
                    model,
                    (example,),
                    str(tmp_out),
                    input_names=["images"],
                    output_names=["features"],
                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                    opset_version=OPSET,
                    dynamo=True,
                    external_data=n_params * 4 > EXTERNAL_BYTES,
                    verbose=False,
                )
            else:
                torch.onnx.export(
                    model,
                    (example,),
                    str(tmp_out),
                    input_names=["images"],
                    output_names=["features"],
                    dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
                    opset_version=OPSET,
                    dynamo=False,
                )
        graph = onnx.load(str(tmp_out), load_external_data=False)
        meta = {
            "producer": "cmae",
            "pool": pool,
            "img_size": str(size),
            "mean": json.dumps(list(encoder.mean)),
            "std": json.dumps(list(encoder.std)),
            "input": "float images [batch, 3, S, S], (x / 255 - mean) / std",
        }
        for k, v in meta.items():
            graph.metadata_props.add(key=k, value=v)
        onnx.save(graph, str(tmp_out))  # external weights, if any, stay referenced by name
        for f in sorted(Path(tmp).iterdir(), key=lambda p: p.name == out.name):
            os.replace(f, out.parent / f.name)  # the graph last: it names its data files
    print(f"cmae export: ONNX written in {time.monotonic() - start:.0f} s", flush=True)
    return out
