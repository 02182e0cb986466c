"""edge_ad.converters: export, quantisation and distillation of trained detectors (torch side)."""
