"""The pretraining command and what only it needs: the loop (pretrain), resume, faults (non-finite
steps, stop signals) and the contrastive-health monitor."""
