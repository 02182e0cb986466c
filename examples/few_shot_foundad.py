"""Few-shot FoundAD from Python: train on 8 good images, evaluate, then score one camera frame.

    python examples/few_shot_foundad.py --data ../shared/data/real --category mvtec_hazelnut_256

The same steps as `edge-ad train` / `edge-ad evaluate`; every CLI verb is a wrapper over these calls.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import edge_ad
from edge_ad.runtime import preprocess, read_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/real")
    parser.add_argument("--category", default="mvtec_hazelnut_256")
    parser.add_argument("--out", default="runs/example_foundad")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()

    run_dir = Path(args.out)
    if not (run_dir / "model.safetensors").exists():
        edge_ad.train("foundad", "efficientnet_lite0", args.data, args.category, run_dir, shots=8, image_size=256,
                      layers=[3], steps=args.steps)
    report = edge_ad.evaluate(run_dir, args.data, args.category)
    print({k: round(v, 3) for k, v in report["metrics"].items()})

    # Scoring a single frame the way a camera delivers it (BGR uint8, any size).
    detector = edge_ad.load_detector(run_dir)
    frame_path = next((Path(args.data) / args.category / "test").glob("*/*.png"))
    frame_bgr = read_image(frame_path, mode="bgr")
    x = preprocess(frame_bgr, detector.preprocess_spec, color_order="bgr")  # (1, 3, H, W) float32
    with torch.no_grad():
        anomaly_map, score = detector(torch.from_numpy(x))
    print(f"{frame_path.name}: score {score.item():.2f} (good-image z-score), map {tuple(anomaly_map.shape)}")


if __name__ == "__main__":
    main()
