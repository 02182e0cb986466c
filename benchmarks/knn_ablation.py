"""knn options measured one at a time on real categories (the ablation in docs/VS_ANOMALIB.md).

    python benchmarks/knn_ablation.py --data ../shared/data/real \\
        --categories bsdata_pitting magnetic_tile mvtec_hazelnut_256 mvtec_transistor_256

EfficientNet-Lite0 (pretrained), layers 2+3, the first ``--shots`` sorted good images; per
category: bilinear vs ``resize="auto"``, ``score_neighbors=9``, ``pool_per_layer``, and (for
non-square frames) the ``auto:256`` input size. Prints one Markdown row per variant: image AUROC,
pixel AUROC, AUPRO (percent), metrics at the model input size on every test image.
"""
from __future__ import annotations

import argparse
from pathlib import Path

VARIANTS = (("bilinear", 1, False), ("auto", 1, False), ("auto", 9, False), ("auto", 1, True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--categories", nargs="+", required=True)
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--side", type=int, default=256)
    args = ap.parse_args(argv)

    import torch

    from edge_ad.data import MVTecDataset, auto_image_size
    from edge_ad.evaluation.evaluate import metrics_from_predictions
    from edge_ad.evaluation.predict import predict_dataset
    from edge_ad.methods.base import BackboneSpec
    from edge_ad.methods.knn import KNNConfig, KNNDetector
    from edge_ad.runtime.preprocessing import preprocess_batch

    print("| category | size | resize | score_neighbors | pool_per_layer | I-AUROC | P-AUROC | AUPRO |")
    print("|---|---|---|---|---|---|---|---|")
    for cat in args.categories:
        train, test = MVTecDataset(args.data, cat, "train"), MVTecDataset(args.data, cat, "test")
        good = [train[i].image for i in range(args.shots)]  # dataset order = sorted paths
        square = (args.side, args.side)
        sizes = [square] + [s for s in [auto_image_size(train.paths, args.side)] if s != square]
        for size in sizes:
            spec = BackboneSpec("efficientnet_lite0", layers=(2, 3), img_size=size, pretrained=True)
            backbone = spec.build()
            for resize, neighbors, per_layer in VARIANTS if size == square else (("auto", 1, False),):
                det = KNNDetector(KNNConfig(backbone=spec, resize=resize, score_neighbors=neighbors,
                                            pool_per_layer=per_layer), backbone=backbone)
                x = torch.from_numpy(preprocess_batch(good, det.preprocess_spec, color_order="rgb"))
                det.fit(x.split(8))
                det.fit_normalization(x.split(8))
                m = metrics_from_predictions(predict_dataset(det, test, det.preprocess_spec, progress=False))
                print(f"| {cat} | {size[0]}x{size[1]} | {resize} | {neighbors} | {per_layer} | "
                      f"{100 * m['image_auroc']:.1f} | {100 * m['pixel_auroc']:.1f} | {100 * m['aupro']:.1f} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
