"""cai-bootstrap: Stage 1 of a self-bootstrapped alignment curriculum."""

__version__ = "0.1.0"
