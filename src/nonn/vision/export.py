"""ONNX export of an image model's feature extractor (the ``onnx`` extra).

What the ONNX file computes: from a float32 batch ``images`` (N, 3, S, S),
RGB values in [0, 255] already resized to the model's ``image_size`` S, the
backbone's own input normalisation, the network, and the global pooled
features ``features`` (N, D) that the model's detector scores; for a SPADE
model also ``pyramid`` (N, C, M, M), the multi-layer feature maps resized to
``map_size`` M, from which the pixel maps are matched.

What it does not include: reading and resizing images (nonn resizes with
antialiased bilinear interpolation: do the same, or score through nonn),
the unit-length scaling of ``normalize=True``, the nearest-neighbor
detector (k-NN / k-NNN and its threshold), the map matching, smoothing and
calibration. Those stay in the ``.nonn`` model file; score exported
features with ``system.anomaly_score_features(features)`` (Feature, and
SPADE with ``image_score='global'``) or ``system.score_pyramids(features,
pyramid)`` (SPADE; with ``test_time_flip``, run the horizontally flipped
batch ``images[..., ::-1]`` too and pass its pyramid as ``mirror_maps=``).
"""

from __future__ import annotations

import numpy as np

from .features import import_torch


def _module(system):
    torch = import_torch()
    import torch.nn.functional as F

    from .systems import SPADE

    bb = system.extractor_.backbone_ if hasattr(system, "extractor_") else None
    if bb is None:
        system.extractor_ = system._extractor().fit()
        bb = system.extractor_.backbone_
    map_size = system.map_size if isinstance(system, SPADE) else None

    class Exported(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = bb

        def forward(self, images):
            x = self.backbone.preprocess(images)
            if map_size is None:
                return self.backbone.pooled(x)
            maps, pooled = self.backbone.pyramid(x)
            maps = [F.interpolate(m, size=(map_size, map_size), mode="bilinear",
                                  align_corners=False) for m in maps]
            return pooled, torch.cat(maps, 1)

    return Exported().eval(), map_size


def export_onnx(system, path, opset=17):
    """Write ``system``'s feature extractor (a fitted or loaded
    :class:`FeatureDetector` or :class:`SPADE`) to ``path`` as ONNX; see the
    module docstring for what the file does and does not include. The batch
    dimension is dynamic. Returns the output names."""
    torch = import_torch()
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install \"nonn[onnx]\"") \
            from None
    from .systems import SPADE, FeatureDetector

    if not isinstance(system, (FeatureDetector, SPADE)):
        raise ValueError(f"Only FeatureDetector and SPADE models are exported; got a "
                         f"{type(system).__name__}.")
    if not hasattr(system, "detector_"):
        raise ValueError("Fit the system (or load a model file) before exporting it.")
    system.set_params(device="cpu")
    if hasattr(system, "extractor_"):
        del system.extractor_
    module, map_size = _module(system)
    size = system.image_size
    dummy = torch.zeros(2, 3, size, size)
    outputs = ["features"] if map_size is None else ["features", "pyramid"]
    dynamic = {"images": {0: "batch"}, **{o: {0: "batch"} for o in outputs}}
    with torch.no_grad():
        torch.onnx.export(module, (dummy,), str(path), input_names=["images"],
                          output_names=outputs, dynamic_axes=dynamic, opset_version=opset,
                          dynamo=False)
    return outputs


def onnx_features(path, images, image_size, batch_size=64):
    """Run an exported file with onnxruntime on images (anything nonn reads),
    resized as nonn resizes them, ``batch_size`` at a time in one session;
    returns the outputs as numpy arrays."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError("Running ONNX models needs onnxruntime: pip install \"nonn[onnx]\"") \
            from None
    from . import _images

    items = _images.as_image_list(images)
    if len(items) == 0:
        raise ValueError("onnx_features needs at least one image; got none.")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = [sess.run(None, {"images": _images.batch_tensor(
                list(items[s:s + batch_size]), image_size).numpy().astype(np.float32)})
            for s in range(0, len(items), batch_size)]
    return [np.concatenate(parts) for parts in zip(*outs)]
