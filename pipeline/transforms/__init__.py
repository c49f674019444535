"""What happens to an image between its file and the model, as pure functions of a batch.

    decode         the one image decoder: bytes -> RGB uint8 near the working size (simplejpeg, PIL, OpenCV)
    stages         the CPU stages, in Ray Data's tasks, NumPy only: crops, flips, ten crops (§2, §4.1)
    device_stages  the float math on the trainer's device (torch): lighting, normalisation, nvJPEG
    lighting       §4.1's PCA of a data set's RGB pixels
    constants      ImageNet's mean, std and principal components

Nothing here imports torch but device_stages: the CPU tasks stay light.
"""
