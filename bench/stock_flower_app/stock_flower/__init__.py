"""Stock Flower FedAvg app used as the baseline of `fedweights bench round`."""
