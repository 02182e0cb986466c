"""Deployment bundles: the one format between the converters and the device. The runtime owns it.

A bundle is a directory (or one ``.tar`` of it)::

    manifest.yaml       what the model is and how to run it (schema below), sealed by manifest_sha256
    model.onnx          always: the portable truth (Q/DQ nodes for TensorRT INT8)
    openvino/model.xml  OpenVINO IR, for OpenVINO targets
    openvino/model.bin
    fidelity.json       converted vs FP32 report (optional)
    engines/            TensorRT engines built on the device later; never listed in the manifest

``manifest.yaml`` (schema_version 1; every key is required, ``null`` where allowed)::

    schema_version: 1
    sdk_version: 0.1.0                      # edge-ad that wrote the bundle
    created: '2025-01-01T12:00:00+00:00'    # ISO 8601
    method: foundad
    backbone: {name: dinov3_vitb16, layers: [9]}
    input: {height: 512, width: 512, color_order: rgb, mean: [...], std: [...], resize: bilinear,
            dtype: float32, layout: NCHW, batch: 1}          # batch null = dynamic
    outputs:
    - {name: anomaly_map, shape: [1, 1, 512, 512], dtype: float32}
    - {name: score, shape: [1], dtype: float32}
    normalization: {map_loc: 0.1, map_scale: 0.02, score_loc: 0.3, score_scale: 0.05, num_images: 16}
    thresholds: {image_threshold: 3.1, pixel_threshold: 2.7, target_fpr: 0.01, pixel_fpr: 0.01,
                 source: good-fpr, details: {num_images: 16, fit_fpr: 0.0}}        # or null
    precision: fp16                         # fp32 | fp16 | int8
    target: jetson-orin                     # a name from edge_ad.runtime.targets
    engine: {name: tensorrt, hints: {}}     # OpenVINO: hints: {INFERENCE_PRECISION_HINT: f32}
    calibration: {count: 256, hash: <sha256 hex>, synthetic_fraction: 0.25, details: {seed: 0}}
                                            # or null; required for int8
    fidelity: {map_max_abs_err: 0.003, image_auroc_delta: 0.0}               # summary, or null
    info: {}                                # free-form plain values for people and tools; never read
    artifacts:
      model.onnx: {sha256: <hex>, bytes: 1234}
    manifest_sha256: <hex>                  # seal: sha256 of the canonical JSON of everything above

Guarantees (details and the tests proving them: ``docs/BUNDLES.md``):

* Only allow-listed artifact types, each checked by parsing its real format at write and at load
  (:mod:`.formats`): ONNX (protobuf), OpenVINO IR (XML + the ``.bin`` it reads), JSON, ``.npy``
  without object dtype, safetensors, and raw weights only as the IR's ``.bin`` or an ONNX model's
  listed external data. Pickles of any protocol, archives (``.npz``, ``.zip``, ``.pkl.gz``) and
  anything else are refused. No file outside ``engines/`` may be unlisted.
* Loading validates the schema strictly (unknown, missing or mistyped keys name the field), the
  schema version (a newer bundle says which edge-ad it needs), cross-field consistency (precision
  allowed by the target, engine of the target, pinned OpenVINO precision hint, calibration for
  INT8, required artifacts), the manifest seal and every artifact's size and sha256.
* The seal ``manifest_sha256`` is an *unkeyed* sha256: integrity (corruption, accidental edits),
  not authenticity: whoever can write the bundle can re-seal it. Authenticity is the optional
  Ed25519 signature ``manifest.sig`` (:mod:`.signing`; ``verify_key=`` refuses unsigned bundles).
* Tar bundles are extracted manifest first, listed artifacts only (plus ``engines/``), each capped
  at its recorded size; sparse members, absolute paths, ``..``, links, devices and duplicates are
  refused (:mod:`.tar`).
* Writing stages and fsyncs everything in a sibling directory, writes ``manifest.yaml`` last, then
  exchanges the directories atomically (or renames the finished ``.tar``): a crash leaves the old
  or the new bundle under the real name. Manifest updates are locked read-verify-modify-writes
  (:mod:`.durable`). It refuses to replace anything that is not a bundle.

Layout of this package: :mod:`.schema` (manifest fields and the seal), :mod:`.integrity` (sizes,
hashes, unlisted files), :mod:`.formats` (the artifact allow-list) with :mod:`.onnx_wire` (ONNX
protobuf reader), :mod:`.tar` (safe ``.tar`` handling), :mod:`.durable` (lock, atomic replace,
fsync), :mod:`.signing` (Ed25519), :mod:`.io` (write / update / load).

Torch-free; needs numpy and PyYAML only (``cryptography`` only when a signing / verify key is given).
"""
from __future__ import annotations

from .io import Bundle, load_bundle, update_manifest, write_bundle
from .schema import (
    ARTIFACT_ONNX,
    ARTIFACT_OPENVINO_BIN,
    ARTIFACT_OPENVINO_XML,
    ENGINES_DIR,
    FIDELITY_FILE,
    INPUT_COLOR_ORDERS,
    INPUT_DTYPES,
    LAYOUTS,
    MANIFEST_FILE,
    OUTPUT_DTYPES,
    PICKLE_SUFFIXES,
    SCHEMA_VERSION,
    SIGNATURE_FILE,
    ArtifactRecord,
    BackboneInfo,
    BundleError,
    Calibration,
    EngineSpec,
    InputSpec,
    Manifest,
    OutputSpec,
    Source,
    Thresholds,
    current_sdk_version,
    manifest_digest,
)
from .signing import generate_signing_key

__all__ = [
    "ARTIFACT_ONNX",
    "ARTIFACT_OPENVINO_BIN",
    "ARTIFACT_OPENVINO_XML",
    "ENGINES_DIR",
    "FIDELITY_FILE",
    "MANIFEST_FILE",
    "SCHEMA_VERSION",
    "SIGNATURE_FILE",
    "ArtifactRecord",
    "BackboneInfo",
    "Bundle",
    "BundleError",
    "Calibration",
    "EngineSpec",
    "InputSpec",
    "Manifest",
    "OutputSpec",
    "Thresholds",
    "current_sdk_version",
    "generate_signing_key",
    "load_bundle",
    "manifest_digest",
    "update_manifest",
    "write_bundle",
]
