"""matrix-spoa: a SPOE agent that routes Matrix Synapse requests for HAProxy."""

__version__ = "0.1.0"
