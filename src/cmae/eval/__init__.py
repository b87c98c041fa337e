"""Evaluation commands on a frozen or fine-tuned encoder: knn, linprobe, finetune."""
