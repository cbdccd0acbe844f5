"""`net.remote`, `flux generator`, `flux keys`: remote generators over CURVE, keys, the weight stream."""
