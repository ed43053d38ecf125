"""Flower glue: the fedweights ServerApp/ClientApp, the round loop, and the simulation runner."""
