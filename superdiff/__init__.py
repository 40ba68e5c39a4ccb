"""SuperDiff studio: compose pretrained diffusion models at sampling time."""

__version__ = "0.1.0"
