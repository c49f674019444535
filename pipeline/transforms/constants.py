"""ImageNet's numbers, in one place: the per-channel mean and std every model input is normalised by,
and the principal components of its RGB pixels that §4.1's lighting follows.

Pixels are scaled to [0, 1]. The eigen-decomposition is fb.resnet.torch's, of the RGB covariance of
the ImageNet training set; the eigenvectors are columns. A run on other data computes its own
(transforms/lighting.py, stored in the shards' manifest).
"""

IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
