"""edge_ad.calibration: calibration sets and score/threshold calibration."""
