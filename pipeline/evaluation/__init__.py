"""Evaluation: distributed feature extraction, chunked CMC/mAP/mINP, k-reciprocal re-ranking, pictures.

Memory is bounded everywhere: metrics never argsort (or even hold) the q x g matrix, re-ranking never
builds the (Q+G)² one. See each module's docstring for how. Pictures: pipeline.evaluation.visualize
(not imported here, so ranks that do not draw never load matplotlib).
"""
from pipeline.evaluation.features import evaluate, extract_features
from pipeline.evaluation.metrics import (feature_distance, pairwise_distance, query_stats_from_features,
                                         rank_metrics, rank_metrics_from_features, summarise)
from pipeline.evaluation.rerank import rerank, rerank_from_features

__all__ = ["evaluate", "extract_features", "feature_distance", "pairwise_distance",
           "query_stats_from_features", "rank_metrics", "rank_metrics_from_features", "rerank",
           "rerank_from_features", "summarise"]
