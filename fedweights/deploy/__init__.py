"""Running fedweights across machines: key material, Flower processes, `server` and `client`."""
