"""Homomorphically encrypted aggregation (TenSEAL BFV): keys, codec, envelope, streaming sum."""
