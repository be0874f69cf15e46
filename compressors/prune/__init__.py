"""Weight pruners (magnitude, Wanda, SparseGPT) and the masks they share."""
