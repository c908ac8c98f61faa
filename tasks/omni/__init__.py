"""Omni-supervised learning (Wei et al.): MS-Celeb-style centroids, mining, dataset distillation (DAS)."""
