"""Augmentation and preprocessing: the train/eval transforms (transforms: the torchvision reference and the eval
resize), the fused per-image training augmentation of the loader workers (fused), and the device half of the data
path (batch: collate, the batched augmentation on the training device, normalisation).
"""
