"""Evaluation commands on a frozen or fine-tuned encoder: knn, linprobe, finetune; frozen holds
what they share (feature extraction and cache, top-k accuracy, results files)."""
