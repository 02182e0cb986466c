"""Evaluation: run detectors over datasets, metrics tables, JSON reports and overlays."""
from .evaluate import REPORT_METRICS, evaluate, format_metrics_table, metrics_from_predictions
from .predict import Predictions, predict_dataset

__all__ = ["REPORT_METRICS", "Predictions", "evaluate", "format_metrics_table", "metrics_from_predictions",
           "predict_dataset"]
