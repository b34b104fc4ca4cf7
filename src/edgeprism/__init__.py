"""edgeprism: position-wise distributed Transformer inference across small edge devices."""

__version__ = "0.1.0"
