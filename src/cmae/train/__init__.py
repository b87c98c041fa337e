"""The commands that train a model and resume: pretrain (the CMAE / MAE loop), segment and
finetune (end to end on a pretrained encoder), and what they share: resume, faults
(non-finite steps, stop signals) and the contrastive-health monitor."""
