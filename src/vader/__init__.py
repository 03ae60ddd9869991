"""vader: align text-to-video diffusion models to rewards by backpropagating through the sampler."""

__version__ = "0.1.0"
