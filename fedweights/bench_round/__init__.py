"""`fedweights bench round`: wall time per round, fedweights versus a stock Flower FedAvg app."""
