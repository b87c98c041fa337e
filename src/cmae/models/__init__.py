"""The networks: the ViT encoder and shared layers (vit), the hybrid ConvViT (convvit), the CMAE
model with the whole method in one file (cmae) and the loss functions (losses)."""
