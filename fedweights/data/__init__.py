"""Embedded datasets and client partitioners."""

from .datasets import labels_of, load_digits_split, load_fashion_mnist
from .partition import dirichlet_partition, iid_partition

__all__ = ["dirichlet_partition", "iid_partition", "labels_of", "load_digits_split", "load_fashion_mnist"]
