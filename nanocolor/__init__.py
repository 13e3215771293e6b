"""nanocolor: grayscale photo colorization with a from-scratch convolutional autoencoder."""
__version__ = "0.1.0"
